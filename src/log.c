/*
 * Error log and access log.
 *
 * Both logs are raw file descriptors, never stdio streams: a FILE buffer could split a line over
 * several write(2) calls, and after fork() a buffer inherited with pending data would be written
 * twice. Every line is built complete in a stack buffer and written with one write(2) on a
 * descriptor opened with O_APPEND, which keeps lines from different worker processes whole and
 * in order on a local file system, without any lock between the processes.
 *
 * The access log is one JSON object per line. The method, the path and the request id come
 * straight from clients, so every string is escaped (control bytes, quotes, backslashes, and bytes
 * that are not part of valid UTF-8) and long values are cut at a character boundary: whatever a
 * client sends, each line parses as JSON.
 */
#include "breakwater/log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* Longest message part of an error-log line; longer messages are cut and marked. */
#define BW_LOG_MSG_MAX 4096
/* Room for the timestamp, level and tag in front of the message. */
#define BW_LOG_PREFIX_MAX 96
/* Access-log lines: a record whose path does not fit gets its path shortened. */
#define BW_LOG_ACCESS_MAX 8192
/* Caps on the escaped form of the other client-supplied strings. */
#define BW_LOG_METHOD_MAX 128
#define BW_LOG_REQUEST_ID_MAX 512
#define BW_LOG_NAME_MAX 256

#define BW_LOG_FILE_MODE 0640

static const char *const level_names[] = {"debug", "info", "warn", "error"};

static int open_log_file(const char *path)
{
    int fd;
    do {
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, BW_LOG_FILE_MODE);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

/* One write(2) of the whole line; a retry after a partial write could interleave with another
 * process's line, so a short write (disk full) loses the rest of that line instead. */
static void write_line(int fd, const char *buf, size_t len)
{
    ssize_t n;
    if (fd < 0 || len == 0)
        return;
    do {
        n = write(fd, buf, len);
    } while (n < 0 && errno == EINTR);
}

static bool is_stderr_name(const char *s)
{
    return s == NULL || s[0] == '\0' || strcmp(s, "stderr") == 0;
}

static bool is_stdout_name(const char *s)
{
    return s == NULL || s[0] == '\0' || strcmp(s, "stdout") == 0;
}

int bw_log_open(bw_log *log, const bw_log_conf *conf, char *err, size_t errlen)
{
    const char *error_log = conf ? conf->error_log : NULL;
    const char *access_log = conf ? conf->access_log : NULL;

    memset(log, 0, sizeof(*log));
    log->error_fd = STDERR_FILENO;
    log->access_fd = STDOUT_FILENO;
    log->level = conf ? conf->level : BW_LOG_INFO;
    log->json = conf ? conf->error_json : false;
    log->query = conf ? conf->query : BW_LOG_QUERY_REDACT;
    bw_log_set_tag(log, "master");

    if (!is_stderr_name(error_log)) {
        int fd = open_log_file(error_log);
        if (fd < 0) {
            snprintf(err, errlen, "cannot open error log %s: %s", error_log, strerror(errno));
            return -1;
        }
        log->error_path = strdup(error_log);
        if (log->error_path == NULL) {
            close(fd);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        log->error_fd = fd;
    }

    if (access_log != NULL && strcmp(access_log, "off") == 0) {
        log->access_fd = -1;
    } else if (access_log != NULL && strcmp(access_log, "stderr") == 0) {
        log->access_fd = STDERR_FILENO;
    } else if (!is_stdout_name(access_log)) {
        int fd = open_log_file(access_log);
        if (fd < 0) {
            snprintf(err, errlen, "cannot open access log %s: %s", access_log, strerror(errno));
            bw_log_close(log);
            return -1;
        }
        log->access_path = strdup(access_log);
        if (log->access_path == NULL) {
            close(fd);
            bw_log_close(log);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        log->access_fd = fd;
    }
    return 0;
}

/*
 * Reopens one file onto the descriptor number already in use. dup3() swaps the file atomically,
 * so a line written concurrently goes either to the old file or to the new one, and the
 * descriptor number every holder of the bw_log knows stays valid.
 */
static int reopen_one(int *fd, const char *path)
{
    int nfd = open_log_file(path);
    if (nfd < 0)
        return -1;
    if (*fd < 0 || *fd <= STDERR_FILENO) {
        *fd = nfd;
        return 0;
    }
    if (dup3(nfd, *fd, O_CLOEXEC) < 0) {
        int saved = errno;
        close(nfd);
        errno = saved;
        return -1;
    }
    close(nfd);
    return 0;
}

void bw_log_reopen(bw_log *log)
{
    if (log->error_path != NULL && reopen_one(&log->error_fd, log->error_path) < 0)
        bw_log_error(log, "cannot reopen error log %s: %s (still writing to the old file)",
                     log->error_path, strerror(errno));
    if (log->access_path != NULL && reopen_one(&log->access_fd, log->access_path) < 0)
        bw_log_error(log, "cannot reopen access log %s: %s (still writing to the old file)",
                     log->access_path, strerror(errno));
}

void bw_log_close(bw_log *log)
{
    if (log->error_path != NULL && log->error_fd > STDERR_FILENO)
        close(log->error_fd);
    if (log->access_path != NULL && log->access_fd > STDERR_FILENO)
        close(log->access_fd);
    free(log->error_path);
    free(log->access_path);
    log->error_path = NULL;
    log->access_path = NULL;
    log->error_fd = STDERR_FILENO;
    log->access_fd = -1;
}

/* A plain bounded copy: gcc 12 with sanitizers misreads snprintf into this member after
 * inlining and fails the -Werror build with a bogus -Warray-bounds. */
void bw_log_set_tag(bw_log *log, const char *tag)
{
    size_t i = 0;
    if (tag != NULL) {
        for (; i < sizeof(log->tag) - 1 && tag[i] != '\0'; i++)
            log->tag[i] = tag[i];
    }
    log->tag[i] = '\0';
}

int bw_log_level_parse(const char *s, bw_log_level *out)
{
    if (s == NULL)
        return -1;
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (bw_log_level)i;
            return 0;
        }
    }
    /* The spelling syslog and most runbooks use. */
    if (strcasecmp(s, "warning") == 0) {
        *out = BW_LOG_WARN;
        return 0;
    }
    return -1;
}

/* "2026-11-25T02:58:58.123Z" (24 characters) into buf, which holds at least 25 bytes. */
static size_t format_time_ms(int64_t ms, char *buf, size_t len)
{
    struct tm tm;
    time_t secs;
    int n;

    if (ms < 0)
        ms = 0;
    secs = (time_t)(ms / 1000);
    if (gmtime_r(&secs, &tm) == NULL)
        memset(&tm, 0, sizeof(tm));
    n = snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    if (n < 0)
        return 0;
    return (size_t)n < len ? (size_t)n : len - 1;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void log_msg_json(bw_log *log, bw_log_level level, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

void bw_log_msg(bw_log *log, bw_log_level level, const char *fmt, ...)
{
    char line[BW_LOG_PREFIX_MAX + BW_LOG_MSG_MAX + 8];
    size_t pos, msg_start, msg_end;
    va_list ap;
    int n;

    if (log == NULL || level < log->level || log->error_fd < 0)
        return;
    if ((unsigned)level >= sizeof(level_names) / sizeof(level_names[0]))
        level = BW_LOG_ERROR;
    if (log->json) {
        va_start(ap, fmt);
        log_msg_json(log, level, fmt, ap);
        va_end(ap);
        return;
    }

    pos = format_time_ms(now_ms(), line, sizeof(line));
    n = snprintf(line + pos, BW_LOG_PREFIX_MAX - pos, " %s %.31s: ", level_names[level], log->tag);
    if (n < 0)
        return;
    pos += (size_t)n < BW_LOG_PREFIX_MAX - pos ? (size_t)n : BW_LOG_PREFIX_MAX - pos - 1;
    msg_start = pos;

    va_start(ap, fmt);
    n = vsnprintf(line + pos, BW_LOG_MSG_MAX + 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > BW_LOG_MSG_MAX) {
        /* Cut, and say so, rather than pretend the message was shorter. */
        msg_end = msg_start + BW_LOG_MSG_MAX - 3;
        memcpy(line + msg_end, "...", 3);
        msg_end += 3;
    } else {
        msg_end = msg_start + (size_t)n;
    }
    /* Messages can quote client or upstream data; a raw newline in them would let that data
     * forge a log line of its own. */
    for (size_t i = msg_start; i < msg_end; i++) {
        unsigned char c = (unsigned char)line[i];
        if (c < 0x20 || c == 0x7f)
            line[i] = ' ';
    }
    line[msg_end++] = '\n';
    write_line(log->error_fd, line, msg_end);
}

/* ---- access log ---- */

typedef struct json_buf {
    char *buf;
    size_t len; /* bytes written so far */
    size_t cap; /* usable bytes (the NUL is not counted) */
    bool overflow;
} json_buf;

static void jb_put(json_buf *jb, const char *s, size_t n)
{
    if (jb->overflow || n > jb->cap - jb->len) {
        jb->overflow = true;
        return;
    }
    memcpy(jb->buf + jb->len, s, n);
    jb->len += n;
}

static void jb_puts(json_buf *jb, const char *s)
{
    jb_put(jb, s, strlen(s));
}

static void jb_printf(json_buf *jb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void jb_printf(json_buf *jb, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(tmp)) {
        jb->overflow = true;
        return;
    }
    jb_put(jb, tmp, (size_t)n);
}

/*
 * Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlong forms, no surrogates,
 * nothing above U+10FFFF), or 0 when the bytes there are not one.
 */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf; /* range allowed for the second byte */

    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return len;
}

/*
 * Writes s as a JSON string (with its quotes), using at most max bytes of output. When the
 * escaped value does not fit, it is cut between characters and ends with "..." so that the
 * line stays valid JSON and the cut is visible.
 */
static void jb_string(json_buf *jb, const char *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t used = 0;
    size_t budget;

    if (s == NULL) {
        jb_puts(jb, "null");
        return;
    }
    if (max < 5) {
        jb->overflow = true;
        return;
    }
    budget = max - 2; /* the quotes */
    jb_put(jb, "\"", 1);
    for (size_t i = 0; i < n;) {
        char esc[8];
        size_t elen, consumed = 1;
        unsigned char c = p[i];

        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            elen = 2;
        } else if (c == '\n' || c == '\r' || c == '\t' || c == '\b' || c == '\f') {
            esc[0] = '\\';
            esc[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : c == '\t' ? 't' : c == '\b' ? 'b' : 'f';
            elen = 2;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 0xf];
            elen = 6;
        } else if (c < 0x80) {
            esc[0] = (char)c;
            elen = 1;
        } else {
            size_t ulen = utf8_seq_len(p + i, n - i);
            if (ulen > 0) {
                memcpy(esc, p + i, ulen);
                elen = ulen;
                consumed = ulen;
            } else {
                /* Not UTF-8: log the byte as the code point of the same value, visibly. */
                memcpy(esc, "\\u00", 4);
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 0xf];
                elen = 6;
            }
        }
        /* Keep room for "..." unless this is the last character. */
        if (used + elen > budget || (i + consumed < n && used + elen > budget - 3)) {
            jb_put(jb, "...", 3);
            break;
        }
        jb_put(jb, esc, elen);
        used += elen;
        i += consumed;
    }
    jb_put(jb, "\"", 1);
}

static void jb_cstring(json_buf *jb, const char *s, size_t max)
{
    jb_string(jb, s, s ? strlen(s) : 0, max);
}

static void jb_ms(json_buf *jb, double v)
{
    if (v < 0 || !isfinite(v))
        jb_puts(jb, "null");
    else
        jb_printf(jb, "%.3f", v);
}

/* Everything up to and including "path": — so that the path can take the room left. */
static void format_head(json_buf *jb, const bw_access_record *rec)
{
    char ts[32];

    format_time_ms(rec->time_ms, ts, sizeof(ts));
    jb_puts(jb, "{\"time\":\"");
    jb_puts(jb, ts);
    jb_puts(jb, "\",\"client\":");
    jb_cstring(jb, rec->client, BW_LOG_NAME_MAX);
    jb_puts(jb, ",\"method\":");
    jb_string(jb, rec->method, rec->method_len, BW_LOG_METHOD_MAX);
    jb_puts(jb, ",\"path\":");
}

static void format_tail(json_buf *jb, const bw_access_record *rec)
{
    jb_printf(jb, ",\"status\":%d", rec->status);
    jb_printf(jb, ",\"bytes_in\":%" PRIu64, rec->bytes_in);
    jb_printf(jb, ",\"bytes_out\":%" PRIu64, rec->bytes_out);
    jb_puts(jb, ",\"upstream\":");
    jb_cstring(jb, rec->upstream, BW_LOG_NAME_MAX);
    jb_puts(jb, ",\"server\":");
    jb_cstring(jb, rec->server, BW_LOG_NAME_MAX);
    jb_puts(jb, ",\"route\":");
    jb_cstring(jb, rec->route, BW_LOG_NAME_MAX);
    jb_puts(jb, ",\"request_id\":");
    jb_string(jb, rec->request_id, rec->request_id_len, BW_LOG_REQUEST_ID_MAX);
    jb_puts(jb, ",\"duration_ms\":");
    jb_ms(jb, rec->duration_ms);
    jb_puts(jb, ",\"upstream_connect_ms\":");
    jb_ms(jb, rec->upstream_connect_ms);
    jb_puts(jb, ",\"upstream_response_ms\":");
    jb_ms(jb, rec->upstream_response_ms);
    jb_printf(jb, ",\"attempts\":%d", rec->attempts);
    jb_puts(jb, ",\"error\":");
    jb_cstring(jb, rec->error, BW_LOG_NAME_MAX);
    jb_puts(jb, rec->tls ? ",\"tls\":true}\n" : ",\"tls\":false}\n");
}

size_t bw_log_access_format(const bw_access_record *rec, char *buf, size_t len)
{
    char scratch[BW_LOG_ACCESS_MAX];
    json_buf probe = {scratch, 0, sizeof(scratch), false};
    json_buf out;
    size_t fixed, path_budget;

    if (rec == NULL || buf == NULL || len == 0)
        return 0;

    /* Measure everything but the path, then give the path what is left of the buffer. */
    format_head(&probe, rec);
    format_tail(&probe, rec);
    if (probe.overflow)
        return 0;
    fixed = probe.len;
    if (fixed + 5 >= len) /* the path needs at least room for "..." */
        return 0;
    path_budget = len - 1 - fixed;

    out = (json_buf){buf, 0, len - 1, false};
    format_head(&out, rec);
    jb_string(&out, rec->path, rec->path_len, path_budget);
    format_tail(&out, rec);
    if (out.overflow)
        return 0;
    buf[out.len] = '\0';
    return out.len;
}

void bw_log_access(bw_log *log, const bw_access_record *rec)
{
    char line[BW_LOG_ACCESS_MAX];
    size_t n;

    if (log == NULL || log->access_fd < 0)
        return;
    /* A path longer than a whole line is cut by the formatter anyway; only what can be
     * shown is rewritten. */
    char target[BW_LOG_ACCESS_MAX];
    bw_access_record r = *rec;
    if (rec->path != NULL && log->query != BW_LOG_QUERY_KEEP) {
        r.path = target;
        r.path_len =
            bw_log_query_apply(log->query, rec->path, rec->path_len, target, sizeof(target));
    }
    n = bw_log_access_format(&r, line, sizeof(line));
    if (n > 0)
        write_line(log->access_fd, line, n);
}

/* ---- error log as JSON ---- */

/* One object a line. The message goes through the same escaper as the access log, so data a
 * message quotes can neither break the object nor forge a line. */
static void log_msg_json(bw_log *log, bw_log_level level, const char *fmt, va_list ap)
{
    char msg[BW_LOG_MSG_MAX + 1];
    char line[BW_LOG_PREFIX_MAX + 6 * BW_LOG_MSG_MAX + 64];
    char ts[32];
    json_buf jb = {line, 0, sizeof(line) - 1, false};

    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t mlen = n < 0 ? 0 : (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1;
    if (n > 0 && (size_t)n > BW_LOG_MSG_MAX)
        memcpy(msg + BW_LOG_MSG_MAX - 3, "...", 3);
    format_time_ms(now_ms(), ts, sizeof(ts));
    jb_puts(&jb, "{\"timestamp\":\"");
    jb_puts(&jb, ts);
    jb_puts(&jb, "\",\"level\":\"");
    jb_puts(&jb, level_names[level]);
    jb_puts(&jb, "\",\"message\":");
    jb_string(&jb, msg, mlen, sizeof(line) - 160);
    jb_puts(&jb, ",\"process\":");
    jb_cstring(&jb, log->tag, sizeof(log->tag) * 6 + 2);
    jb_printf(&jb, ",\"pid\":%d}\n", (int)getpid());
    if (!jb.overflow)
        write_line(log->error_fd, line, jb.len);
}

/* ---- query strings in the access log ---- */

size_t bw_log_query_apply(bw_log_query mode, const char *target, size_t len, char *out, size_t cap)
{
    const char *q = target ? memchr(target, '?', len) : NULL;
    size_t head = q ? (size_t)(q - target) : len;
    size_t o = 0;

    if (cap == 0)
        return 0;
    if (mode == BW_LOG_QUERY_KEEP || q == NULL) {
        o = len < cap ? len : cap;
        memcpy(out, target, o);
        return o;
    }
    o = head < cap ? head : cap;
    memcpy(out, target, o);
    if (mode == BW_LOG_QUERY_DROP || o == cap)
        return o;
    out[o++] = '?';
    /* Parameters are separated by '&'; in each, the name runs to the first '='. */
    size_t i = head + 1;
    while (i <= len && o < cap) {
        size_t end = i;
        while (end < len && target[end] != '&')
            end++;
        const char *eq = memchr(target + i, '=', end - i);
        if (eq != NULL) {
            size_t nlen = (size_t)(eq - (target + i));
            bool has_value = (size_t)(eq - target) + 1 < end;
            size_t need = nlen + 1 + (has_value ? 1 : 0);
            if (need > cap - o)
                break;
            memcpy(out + o, target + i, nlen + 1);
            o += nlen + 1;
            if (has_value)
                out[o++] = '-';
        } else if (end > i) {
            out[o++] = '-'; /* a bare parameter may be a secret itself */
        }
        if (end >= len)
            break;
        if (o < cap)
            out[o++] = '&';
        i = end + 1;
    }
    return o;
}
