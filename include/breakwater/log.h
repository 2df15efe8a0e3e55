/*
 * Logging: the error log (levelled, human-readable lines) and the access log (one JSON object per
 * request). Both are plain file descriptors owned by the per-process bw_log; the master opens them,
 * workers inherit them, and SIGUSR1 reopens them (for logrotate) in every process.
 * Writes are single write(2) calls of a whole line, so lines from several processes never
 * interleave (O_APPEND). Nothing here ever logs a header value other than the ones listed in the
 * access-log record: no Authorization, no cookies, no tokens.
 */
#ifndef BREAKWATER_LOG_H
#define BREAKWATER_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "breakwater/config.h"

typedef struct bw_log {
    int error_fd;  /* stderr or a file */
    int access_fd; /* stdout, a file, or -1 when off */
    bw_log_level level;
    char *error_path;   /* NULL for stderr */
    char *access_path;  /* NULL for stdout / off */
    char tag[32];       /* "master" or "worker 3", prefixed to error lines */
    bool json;          /* error lines as JSON objects (log.error_format "json") */
    bw_log_query query; /* what the access log keeps of query strings */
} bw_log;

/* Opens the destinations named by the configuration. Returns 0, or -1 with a reason in err. */
int bw_log_open(bw_log *log, const bw_log_conf *conf, char *err, size_t errlen);
/* Reopens files (SIGUSR1). Keeps the old descriptor when the reopen fails, and says so. */
void bw_log_reopen(bw_log *log);
void bw_log_close(bw_log *log);
void bw_log_set_tag(bw_log *log, const char *tag);

/* "2026-11-25T02:58:58.123Z level tag: message" to the error log when level >= log->level, or
 * with log->json {"timestamp":"...","level":"warn","message":"...","process":"worker 1",
 * "pid":123}. */
void bw_log_msg(bw_log *log, bw_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define bw_log_debug(l, ...) bw_log_msg((l), BW_LOG_DEBUG, __VA_ARGS__)
#define bw_log_info(l, ...) bw_log_msg((l), BW_LOG_INFO, __VA_ARGS__)
#define bw_log_warn(l, ...) bw_log_msg((l), BW_LOG_WARN, __VA_ARGS__)
#define bw_log_error(l, ...) bw_log_msg((l), BW_LOG_ERROR, __VA_ARGS__)

/* Parses "debug" | "info" | "warn" | "error". Returns 0 or -1. */
int bw_log_level_parse(const char *s, bw_log_level *out);

/* One access-log record. Strings need not be NUL-terminated; NULL means absent. */
typedef struct bw_access_record {
    int64_t time_ms;    /* wall clock, start of the request */
    const char *client; /* client address, "ip:port" */
    const char *method;
    size_t method_len;
    const char *path; /* request target */
    size_t path_len;
    int status;
    uint64_t bytes_in;    /* request body bytes received */
    uint64_t bytes_out;   /* response bytes sent (head + body) */
    const char *upstream; /* upstream name or NULL */
    const char *server;   /* upstream server address or NULL */
    const char *route;    /* route name or NULL */
    const char *request_id;
    size_t request_id_len;
    double duration_ms;          /* total */
    double upstream_connect_ms;  /* -1 when no connection was made */
    double upstream_response_ms; /* time to the response head; -1 when none */
    int attempts;                /* upstream attempts made */
    const char *error;           /* proxy-side error kind, or NULL */
    bool tls;
} bw_access_record;

/*
 * Rewrites a request target's query for the access log. KEEP copies it; DROP cuts it at the '?';
 * REDACT keeps each parameter's name and replaces its value with "-" ("?token=abc&a=1" becomes
 * "?token=-&a=-"). A parameter without '=' ("?abc123") may itself be a secret, so it becomes
 * "-" too; empty parameters ("&&") and empty values ("a=") stay as they are; everything after
 * the first '=' of a parameter is its value ("a=b=c" becomes "a=-"). The output is never longer
 * than the input; it is cut at cap bytes (never in the middle of a value, which is never copied).
 * Returns the length written.
 */
size_t bw_log_query_apply(bw_log_query mode, const char *target, size_t len, char *out, size_t cap);

/* Formats a record as one JSON line (escaping every string) and writes it. */
void bw_log_access(bw_log *log, const bw_access_record *rec);
/* Formats into buf (for tests); returns the length written, excluding the NUL, or 0 if too small.
 */
size_t bw_log_access_format(const bw_access_record *rec, char *buf, size_t len);

#endif
