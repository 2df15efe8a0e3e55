/*
 * Unit tests for src/notify.c: NOTIFY_SOCKET address parsing (path, abstract namespace, and the
 * values that must be refused), the RELOADING message, and one datagram sent to a socket the
 * test binds itself.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "breakwater/notify.h"

static void test_parse_addresses(void **state)
{
    (void)state;
    struct sockaddr_un a;
    socklen_t len;
    char err[200];
    assert_int_equal(bw_notify_parse_address("/run/systemd/notify", &a, &len, err, sizeof err), 0);
    assert_string_equal(a.sun_path, "/run/systemd/notify");
    assert_int_equal(len,
                     offsetof(struct sockaddr_un, sun_path) + strlen("/run/systemd/notify") + 1);

    assert_int_equal(bw_notify_parse_address("@bw-test", &a, &len, err, sizeof err), 0);
    assert_int_equal(a.sun_path[0], '\0');
    assert_memory_equal(a.sun_path + 1, "bw-test", 7);
    assert_int_equal(len, offsetof(struct sockaddr_un, sun_path) + 8); /* no trailing NUL */

    assert_int_equal(bw_notify_parse_address("", &a, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "empty"));
    assert_int_equal(bw_notify_parse_address("relative/sock", &a, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "absolute path or start with '@'"));
    char longer[200];
    memset(longer, 'x', sizeof longer - 1);
    longer[0] = '/';
    longer[sizeof longer - 1] = '\0';
    assert_int_equal(bw_notify_parse_address(longer, &a, &len, err, sizeof err), -1);
    assert_non_null(strstr(err, "too long"));
}

static void test_reloading_message(void **state)
{
    (void)state;
    char buf[128];
    size_t n = bw_notify_format_reloading(123456789u, "reloading x.json", buf, sizeof buf);
    assert_string_equal(buf, "RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading x.json\n");
    assert_int_equal(n, strlen(buf));
    assert_int_equal(bw_notify_format_reloading(1, "status", buf, 10), 0);
}

static void test_off_and_send(void **state)
{
    (void)state;
    bw_notify n;
    char err[200];
    assert_int_equal(bw_notify_open(&n, NULL, err, sizeof err), 0);
    assert_int_equal(n.fd, -1);
    assert_int_equal(bw_notify_send(&n, "READY=1\n"), 0); /* off: a no-op */
    assert_int_equal(bw_notify_open(&n, "nope", err, sizeof err), -1);
    assert_int_equal(n.fd, -1);

    int rx = socket(AF_UNIX, SOCK_DGRAM, 0);
    assert_true(rx >= 0);
    char name[64];
    snprintf(name, sizeof name, "@bw-unit-notify-%d", (int)getpid());
    struct sockaddr_un a;
    socklen_t len;
    assert_int_equal(bw_notify_parse_address(name, &a, &len, err, sizeof err), 0);
    assert_int_equal(bind(rx, (struct sockaddr *)&a, len), 0);
    assert_int_equal(bw_notify_open(&n, name, err, sizeof err), 0);
    assert_int_equal(bw_notify_send(&n, "READY=1\nSTATUS=ok\n"), 0);
    char got[64] = "";
    ssize_t r = recv(rx, got, sizeof got - 1, 0);
    assert_int_equal(r, (ssize_t)strlen("READY=1\nSTATUS=ok\n"));
    assert_string_equal(got, "READY=1\nSTATUS=ok\n");
    bw_notify_close(&n);
    assert_int_equal(n.fd, -1);
    close(rx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_addresses),
        cmocka_unit_test(test_reloading_message),
        cmocka_unit_test(test_off_and_send),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
