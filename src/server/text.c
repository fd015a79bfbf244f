/* Text that came from a client, made safe to show. A URL, a header or a message that
 * quotes them may hold any bytes: jansson refuses to encode invalid UTF-8 (the answer
 * would be lost), and CR/LF or ESC written raw into a log line or a terminal forge lines
 * and colours. srv_text_clean() keeps valid UTF-8, writes every other byte as \xNN, and
 * cuts on a character boundary when the space runs out. */
#include "server/server.h"

#include <string.h>

/* the length of the valid UTF-8 sequence at s (RFC 3629: no overlong forms, no surrogates,
 * nothing above U+10FFFF), or 0 when the byte at s does not start one */
static size_t utf8_sequence(const unsigned char *s, size_t len)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    unsigned lo = 0x80, hi = 0xbf;   /* the allowed range of the second byte */
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0)
            lo = 0xa0;               /* overlong below U+0800 */
        else if (c == 0xed)
            hi = 0x9f;               /* UTF-16 surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0)
            lo = 0x90;               /* overlong below U+10000 */
        else if (c == 0xf4)
            hi = 0x8f;               /* above U+10FFFF */
    } else {
        return 0;
    }
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* C0 controls, DEL, and the C1 controls U+0080..U+009F (0xC2 0x80..0x9F), which some
 * terminals obey as escape sequences */
static bool is_control(const unsigned char *s, size_t n)
{
    if (n == 1)
        return s[0] < 0x20 || s[0] == 0x7f;
    return n == 2 && s[0] == 0xc2 && s[1] < 0xa0;
}

size_t srv_text_clean(char *dst, size_t cap, const char *src, size_t len, unsigned flags)
{
    static const char hex[] = "0123456789abcdef";
    if (cap == 0)
        return 0;
    const unsigned char *s = (const unsigned char *)src;
    size_t out = 0;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_sequence(s + i, len - i);
        bool escape = n == 0 || ((flags & SRV_TEXT_ESCAPE_CONTROLS) && is_control(s + i, n));
        size_t take = n ? n : 1;    /* bytes of the source this step consumes */
        size_t need = escape ? 4 * take : take;
        if (out + need + 1 > cap)
            break;                  /* never half a character or half an escape */
        if (escape) {
            for (size_t k = 0; k < take; k++) {
                dst[out++] = '\\';
                dst[out++] = 'x';
                dst[out++] = hex[s[i + k] >> 4];
                dst[out++] = hex[s[i + k] & 15];
            }
        } else {
            memcpy(dst + out, s + i, take);
            out += take;
        }
        i += take;
    }
    dst[out] = '\0';
    return out;
}
