/*
 * sd_notify without libsystemd.
 *
 * The protocol is one datagram per notification on an AF_UNIX socket whose address systemd puts
 * in $NOTIFY_SOCKET; with NotifyAccess=main only the unit's main process (the master) may send.
 * Implementing it here is a few dozen lines and keeps the binary free of a libsystemd dependency
 * that containers and non-systemd hosts would have to carry for nothing. The socket is
 * non-blocking: if the manager's queue is full a notification is dropped rather than stalling
 * the master's loop, and the next state change says the whole state again (every message carries
 * STATUS along with its state key).
 */
#include "breakwater/notify.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int bw_notify_parse_address(const char *value, struct sockaddr_un *out, socklen_t *len, char *err,
                            size_t errlen)
{
    size_t n = value ? strlen(value) : 0;
    memset(out, 0, sizeof(*out));
    out->sun_family = AF_UNIX;
    if (n == 0) {
        snprintf(err, errlen, "NOTIFY_SOCKET is empty");
        return -1;
    }
    if (n >= sizeof(out->sun_path)) {
        snprintf(err, errlen, "NOTIFY_SOCKET is too long (%zu bytes, at most %zu)", n,
                 sizeof(out->sun_path) - 1);
        return -1;
    }
    if (value[0] != '/' && value[0] != '@') {
        snprintf(err, errlen,
                 "NOTIFY_SOCKET must be an absolute path or start with '@', got \"%s\"", value);
        return -1;
    }
    memcpy(out->sun_path, value, n);
    if (value[0] == '@') {
        /* Abstract names are not NUL-terminated: the length says where they end. */
        out->sun_path[0] = '\0';
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    } else {
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    }
    return 0;
}

int bw_notify_open(bw_notify *n, const char *value, char *err, size_t errlen)
{
    memset(n, 0, sizeof(*n));
    n->fd = -1;
    if (value == NULL || value[0] == '\0')
        return 0;
    if (bw_notify_parse_address(value, &n->addr, &n->addr_len, err, errlen) < 0)
        return -1;
    n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (n->fd < 0) {
        snprintf(err, errlen, "notification socket: %s", strerror(errno));
        return -1;
    }
    return 0;
}

int bw_notify_send(bw_notify *n, const char *msg)
{
    if (n == NULL || n->fd < 0)
        return 0;
    ssize_t r;
    do {
        r = sendto(n->fd, msg, strlen(msg), MSG_NOSIGNAL, (const struct sockaddr *)&n->addr,
                   n->addr_len);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -1 : 0;
}

size_t bw_notify_format_reloading(uint64_t monotonic_usec, const char *status, char *buf,
                                  size_t len)
{
    int r = snprintf(buf, len, "RELOADING=1\nMONOTONIC_USEC=%" PRIu64 "\nSTATUS=%s\n",
                     monotonic_usec, status ? status : "");
    return r < 0 || (size_t)r >= len ? 0 : (size_t)r;
}

void bw_notify_close(bw_notify *n)
{
    if (n->fd >= 0)
        close(n->fd);
    n->fd = -1;
}
