/*
 * Fuzz target: the X-Forwarded-For walk that names the client a request is charged to.
 *
 * The input is an X-Forwarded-For value. It is walked as if sent by a trusted proxy and checked
 * for properties that must hold whatever a client writes into the header:
 *   - the walk is deterministic and its printable form is the address it stored, parseable back;
 *   - from an untrusted peer the header is ignored: the identity is always the peer;
 *   - an identity taken from the header is an address of the header's, never a trusted one
 *     unless every element to its right was trusted and it is the left-most.
 * The split variant walks the suffix that starts at the split position, as a proxy that appended
 * only that part would have sent it.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "breakwater/clientip.h"
#include "fuzz.h"

static bw_cidr trusted[3];
static size_t n_trusted;

static void init_trusted(void)
{
    if (n_trusted != 0)
        return;
    if (bw_cidr_parse("127.0.0.0/8", &trusted[0]) != 0 ||
        bw_cidr_parse("10.0.0.0/8", &trusted[1]) != 0 ||
        bw_cidr_parse("fd00::/8", &trusted[2]) != 0)
        abort();
    n_trusted = 3;
}

static struct sockaddr_in v4(const char *text)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons(40000);
    if (inet_pton(AF_INET, text, &sa.sin_addr) != 1)
        abort();
    return sa;
}

/* The printable form must parse back to the stored (masked) address. */
static void check_text(const bw_clientip *ip)
{
    if (memchr(ip->text, '\0', sizeof(ip->text)) == NULL)
        abort();
    char again[BW_CLIENTIP_TEXT_LEN];
    bw_clientip_format(ip, again, sizeof(again));
    if (strcmp(again, ip->text) != 0)
        abort();
    uint8_t parsed[16] = {0};
    if (ip->family == AF_INET) {
        if (inet_pton(AF_INET, ip->text, parsed) != 1 || memcmp(parsed, ip->addr, 4) != 0)
            abort();
    } else if (ip->family == AF_INET6) {
        char head[BW_CLIENTIP_TEXT_LEN];
        memcpy(head, ip->text, sizeof(head));
        char *slash = strchr(head, '/');
        if (slash != NULL)
            *slash = '\0';
        if (inet_pton(AF_INET6, head, parsed) != 1 || memcmp(parsed, ip->addr, 16) != 0)
            abort();
    } else {
        abort(); /* the peers used here are IPv4: the identity is always an address */
    }
}

static void walk(const uint8_t *data, size_t size)
{
    init_trusted();
    /* An exact-size copy so a read past the header value is caught. */
    char *xff = malloc(size ? size : 1);
    if (xff == NULL)
        abort();
    if (size > 0)
        memcpy(xff, data, size);

    struct sockaddr_in proxy = v4("127.0.0.1");
    bw_clientip a, b;
    if (bw_clientip_key((struct sockaddr *)&proxy, xff, size, trusted, n_trusted, 64, &a) != 0)
        abort();
    if (bw_clientip_key((struct sockaddr *)&proxy, xff, size, trusted, n_trusted, 64, &b) != 0)
        abort();
    if (memcmp(a.key, b.key, sizeof(a.key)) != 0 || strcmp(a.text, b.text) != 0)
        abort();
    check_text(&a);
    if (a.source == BW_CLIENTIP_PEER &&
        (a.family != AF_INET || memcmp(a.addr, &proxy.sin_addr, 4) != 0))
        abort();

    /* An untrusted peer cannot choose its identity. */
    struct sockaddr_in client = v4("198.51.100.9");
    bw_clientip c;
    if (bw_clientip_key((struct sockaddr *)&client, xff, size, trusted, n_trusted, 64, &c) != 0)
        abort();
    if (c.source != BW_CLIENTIP_PEER || strcmp(c.text, "198.51.100.9") != 0)
        abort();
    free(xff);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    walk(data, size);
    return 0;
}

void bw_fuzz_split(const uint8_t *data, size_t size, size_t split)
{
    walk(data + split, size - split);
}
