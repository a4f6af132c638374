// serde_json pretty-printed int8 arrays, for manifest saves.
//
// Each element is `indent` spaces, the number and ",\n" (the array's last
// element ends in "\n"). Records are copied 16 bytes at a time from a table
// and the output pointer advances by the record's true length, so there is no
// per-element branch or formatting.

#include <cstddef>
#include <cstdint>
#include <cstring>

extern "C" {

// Writes q[0..n) to out and returns the bytes written. `out` must hold
// n * (indent + 6) + 16 bytes; indent must be in [0, 10]. With `last` set,
// the final element ends in "\n" instead of ",\n".
size_t SqInt8Lines(const int8_t* q, size_t n, int indent, int last, char* out) {
  if (indent < 0 || indent > 10 || n == 0) return 0;
  char table[256][16];
  unsigned char len[256];
  for (int v = -128; v < 128; ++v) {
    char* rec = table[uint8_t(v)];
    std::memset(rec, ' ', 16);
    char digits[8];
    int d = 0, a = v < 0 ? -v : v;
    do {
      digits[d++] = char('0' + a % 10);
      a /= 10;
    } while (a);
    int p = indent;
    if (v < 0) rec[p++] = '-';
    while (d) rec[p++] = digits[--d];
    rec[p++] = ',';
    rec[p++] = '\n';
    len[uint8_t(v)] = (unsigned char)p;
  }
  char* o = out;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t u = uint8_t(q[i]);
    std::memcpy(o, table[u], 16);
    o += len[u];
  }
  if (last) {
    o[-2] = '\n';  // drop the final comma
    o -= 1;
  }
  return size_t(o - out);
}

}  // extern "C"

extern "C" {

// Parses the body of an int8 array in the layout serde and we write:
// "\n<indent>num" elements separated by commas (`final`: no trailing comma;
// otherwise every element, the last included, is followed by one). Numbers are
// JSON integers in [-127, 127] ("-0" included). Returns the count written to
// out (at most max_out), or -1 if the text deviates from the layout in any way
// (the caller then runs the general parser, which reports what is wrong).
int64_t SqParseInt8Canonical(const char* text, size_t len, int indent, int final, int8_t* out,
                             size_t max_out) {
  const char* p = text;
  const char* end = text + len;
  size_t count = 0;
  while (p < end) {
    if (count == max_out || end - p < indent + 2 || *p != '\n') return -1;
    ++p;
    for (int i = 0; i < indent; ++i, ++p)
      if (*p != ' ') return -1;
    bool neg = false;
    if (p < end && *p == '-') neg = true, ++p;
    int v = 0, digits = 0;
    while (p < end && *p >= '0' && *p <= '9' && digits < 4) v = v * 10 + (*p++ - '0'), ++digits;
    if (digits == 0 || digits > 3 || v > 127) return -1;
    if (digits > 1 && p[-digits] == '0') return -1;  // leading zero
    out[count++] = int8_t(neg ? -v : v);
    if (p == end) return final ? int64_t(count) : -1;
    if (*p != ',') return -1;
    ++p;
    if (p == end) return final ? -1 : int64_t(count);
  }
  return -1;
}

}  // extern "C"
