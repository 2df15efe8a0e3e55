/*
 * Service-manager notification (the sd_notify protocol): the master tells systemd, or anything
 * that listens on $NOTIFY_SOCKET, when it is ready, reloading or stopping, and what it is doing.
 * One AF_UNIX datagram per state change, "KEY=VALUE" lines; a path beginning with '@' names a
 * socket in the abstract namespace. Without $NOTIFY_SOCKET every call is a no-op.
 */
#ifndef BREAKWATER_NOTIFY_H
#define BREAKWATER_NOTIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

typedef struct bw_notify {
    int fd; /* -1 when notifications are off */
    struct sockaddr_un addr;
    socklen_t addr_len;
} bw_notify;

/*
 * Turns a $NOTIFY_SOCKET value into a socket address: "/run/x" is a path, "@name" the abstract
 * socket "\0name". Returns 0, or -1 with a reason in err (empty, too long, not absolute).
 */
int bw_notify_parse_address(const char *value, struct sockaddr_un *out, socklen_t *len, char *err,
                            size_t errlen);

/*
 * Opens the notification socket named by value ($NOTIFY_SOCKET; NULL or "" means none, which is
 * not an error). Returns 0, or -1 with a reason in err; either way n is usable (off on error).
 */
int bw_notify_open(bw_notify *n, const char *value, char *err, size_t errlen);

/* Sends one datagram. Returns 0, or -1 with errno set (0 when notifications are off). */
int bw_notify_send(bw_notify *n, const char *msg);

/* "RELOADING=1\nMONOTONIC_USEC=<usec>\nSTATUS=<status>\n" into buf; returns the length, or 0
 * when buf is too small. */
size_t bw_notify_format_reloading(uint64_t monotonic_usec, const char *status, char *buf,
                                  size_t len);

void bw_notify_close(bw_notify *n);

#endif
