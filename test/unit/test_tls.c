/*
 * Unit tests for src/tls.c. A throwaway P-256 key and self-signed certificate are made at test
 * time; handshakes run in memory over BIO pairs, so no socket is involved. Covered: context
 * policy, the diagnostics for bad files and mismatched keys, the ALPN choice, ticket resumption
 * between two contexts built with the same keys (what happens across workers and reloads),
 * refusal of TLS 1.1, and the memory that SSL_MODE_RELEASE_BUFFERS saves per idle connection.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "breakwater/tls.h"

static char tmpdir[256];
static char cert_path[512], key_path[512], other_key_path[512], garbage_path[512];

/* ---- counting allocator: installed before OpenSSL allocates anything ---- */

static size_t live_bytes;
#define HDR 16

static void *count_malloc(size_t n, const char *file, int line)
{
    (void)file;
    (void)line;
    unsigned char *p = malloc(n + HDR);
    if (p == NULL)
        return NULL;
    memcpy(p, &n, sizeof(n));
    live_bytes += n;
    return p + HDR;
}

static void count_free(void *ptr, const char *file, int line)
{
    (void)file;
    (void)line;
    size_t n;
    if (ptr == NULL)
        return;
    unsigned char *p = (unsigned char *)ptr - HDR;
    memcpy(&n, p, sizeof(n));
    live_bytes -= n;
    free(p);
}

static void *count_realloc(void *ptr, size_t n, const char *file, int line)
{
    size_t old;
    if (ptr == NULL)
        return count_malloc(n, file, line);
    unsigned char *p = (unsigned char *)ptr - HDR;
    memcpy(&old, p, sizeof(old));
    unsigned char *q = realloc(p, n + HDR);
    if (q == NULL)
        return NULL;
    memcpy(q, &n, sizeof(n));
    live_bytes = live_bytes - old + n;
    return q + HDR;
}

/* ---- fixtures ---- */

static EVP_PKEY *new_key(void)
{
    EVP_PKEY *k = EVP_EC_gen("P-256");
    assert_non_null(k);
    return k;
}

static void write_key(EVP_PKEY *k, const char *path)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);
}

static void write_self_signed(EVP_PKEY *k, const char *path)
{
    X509 *x = X509_new();
    X509_NAME *name;
    FILE *f;

    assert_non_null(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, k);
    name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                               0);
    X509_set_issuer_name(x, name);
    assert_true(X509_sign(x, k, EVP_sha256()) > 0);
    f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_X509(f, x), 1);
    fclose(f);
    X509_free(x);
}

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/bw-test-tls-XXXXXX", base ? base : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    snprintf(cert_path, sizeof(cert_path), "%s/server.crt", tmpdir);
    snprintf(key_path, sizeof(key_path), "%s/server.key", tmpdir);
    snprintf(other_key_path, sizeof(other_key_path), "%s/other.key", tmpdir);
    snprintf(garbage_path, sizeof(garbage_path), "%s/garbage.pem", tmpdir);

    EVP_PKEY *k = new_key(), *other = new_key();
    write_key(k, key_path);
    write_self_signed(k, cert_path);
    write_key(other, other_key_path);
    EVP_PKEY_free(k);
    EVP_PKEY_free(other);

    FILE *f = fopen(garbage_path, "w");
    if (f == NULL)
        return -1;
    fputs("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", f);
    fclose(f);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static bw_listener_conf listener(const char *address, const char *cert, const char *key)
{
    bw_listener_conf l;
    memset(&l, 0, sizeof(l));
    l.address = (char *)address;
    l.tls_enabled = true;
    l.tls.cert = (char *)cert;
    l.tls.key = (char *)key;
    return l;
}

static SSL_CTX *good_ctx(bw_tls_keys *keys)
{
    bw_listener_conf l = listener("127.0.0.1:8443", cert_path, key_path);
    bw_diag d;
    bw_diag_init(&d);
    SSL_CTX *ctx = bw_tls_ctx_new(&l, 0, "breakwater.json", keys, &d, NULL);
    assert_non_null(ctx);
    assert_int_equal(d.count, 0);
    bw_diag_free(&d);
    return ctx;
}

static SSL_CTX *client_ctx(int min_version, int max_version)
{
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    assert_non_null(c);
    SSL_CTX_set_security_level(c, 0);
    assert_int_equal(SSL_CTX_set_cipher_list(c, "DEFAULT:@SECLEVEL=0"), 1);
    assert_int_equal(SSL_CTX_set_min_proto_version(c, min_version), 1);
    assert_int_equal(SSL_CTX_set_max_proto_version(c, max_version), 1);
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    return c;
}

typedef struct conn_pair {
    SSL *client;
    SSL *server;
} conn_pair;

static conn_pair pair_new(SSL_CTX *cctx, SSL_CTX *sctx)
{
    conn_pair p;
    BIO *cb, *sb;
    p.client = SSL_new(cctx);
    p.server = SSL_new(sctx);
    assert_non_null(p.client);
    assert_non_null(p.server);
    assert_int_equal(BIO_new_bio_pair(&cb, 0, &sb, 0), 1);
    SSL_set_bio(p.client, cb, cb);
    SSL_set_bio(p.server, sb, sb);
    SSL_set_connect_state(p.client);
    SSL_set_accept_state(p.server);
    return p;
}

/* A clean close: OpenSSL marks the session of a connection freed without close_notify as not
 * resumable, as a client would after an abrupt end. */
static void pair_free(conn_pair *p)
{
    SSL_shutdown(p->client);
    SSL_shutdown(p->server);
    SSL_free(p->client);
    SSL_free(p->server);
}

static bool step(SSL *s, bool *done)
{
    if (*done)
        return true;
    int r = SSL_do_handshake(s);
    if (r == 1) {
        *done = true;
        return true;
    }
    int e = SSL_get_error(s, r);
    return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
}

/* Runs both ends until the handshake completes (0) or either side fails (-1). The error queue
 * is left as the failure left it, for the caller to inspect. */
static int handshake(conn_pair *p)
{
    bool cdone = false, sdone = false;
    for (int i = 0; i < 100 && !(cdone && sdone); i++) {
        if (!step(p->client, &cdone) || !step(p->server, &sdone))
            return -1;
    }
    if (!(cdone && sdone))
        return -1;
    /* Let the client take in what the server sent after its Finished (TLS 1.3 tickets). */
    char buf[16];
    int r = SSL_read(p->client, buf, sizeof(buf));
    assert_true(r <= 0 && SSL_get_error(p->client, r) == SSL_ERROR_WANT_READ);
    return 0;
}

static bool error_queue_has_reason(int reason)
{
    unsigned long e;
    bool found = false;
    while ((e = ERR_get_error()) != 0)
        if (ERR_GET_REASON(e) == reason)
            found = true;
    return found;
}

/* ---- tests ---- */

static void test_keys_generate(void **state)
{
    (void)state;
    bw_tls_keys a, b;
    assert_int_equal(bw_tls_keys_generate(&a), 0);
    assert_int_equal(bw_tls_keys_generate(&b), 0);
    assert_null(a.rings);
    /* Two contexts with the same period share one ring; each key set starts from its own
     * randomness. */
    bw_listener_conf l = listener("127.0.0.1:8443", cert_path, key_path);
    l.tls.ticket_rotate_ms = 5000;
    bw_diag d;
    bw_diag_init(&d);
    SSL_CTX *x = bw_tls_ctx_new(&l, 0, "breakwater.json", &a, &d, NULL);
    SSL_CTX *y = bw_tls_ctx_new(&l, 0, "breakwater.json", &a, &d, NULL);
    SSL_CTX *z = bw_tls_ctx_new(&l, 0, "breakwater.json", &b, &d, NULL);
    assert_int_equal(d.count, 0);
    assert_non_null(a.rings);
    assert_null(a.rings->next);
    assert_int_equal(a.rings->period_ms, 5000);
    assert_memory_not_equal(a.rings->keys[0].aes, b.rings->keys[0].aes, 32);
    assert_memory_not_equal(a.rings->keys[0].name, b.rings->keys[0].name, 16);
    /* Sessions live two periods. */
    assert_int_equal(SSL_CTX_get_timeout(x), 10);
    l.tls.ticket_rotate_ms = 7000;
    SSL_CTX *w = bw_tls_ctx_new(&l, 0, "breakwater.json", &a, &d, NULL);
    assert_non_null(a.rings->next);
    bw_diag_free(&d);
    bw_tls_ctx_free(x);
    bw_tls_ctx_free(y);
    bw_tls_ctx_free(z);
    bw_tls_ctx_free(w);
    bw_tls_keys_free(&a);
    bw_tls_keys_free(&b);
    assert_null(a.rings);
}

static void test_library_version(void **state)
{
    (void)state;
    const char *v = bw_tls_library_version();
    assert_non_null(v);
    assert_non_null(strstr(v, "OpenSSL 3"));
}

static void test_good_context_policy(void **state)
{
    (void)state;
    bw_tls_keys keys;
    assert_int_equal(bw_tls_keys_generate(&keys), 0);
    SSL_CTX *ctx = good_ctx(&keys);

    assert_int_equal(SSL_CTX_get_min_proto_version(ctx), TLS1_2_VERSION);
    assert_int_equal(SSL_CTX_get_max_proto_version(ctx), TLS1_3_VERSION);
    uint64_t opts = SSL_CTX_get_options(ctx);
    assert_true(opts & SSL_OP_NO_COMPRESSION);
    assert_true(opts & SSL_OP_NO_RENEGOTIATION);
    assert_false(opts & SSL_OP_NO_TICKET);
    assert_false(opts & SSL_OP_CIPHER_SERVER_PREFERENCE);
    assert_true(SSL_CTX_get_mode(ctx) & SSL_MODE_RELEASE_BUFFERS);
    assert_true(SSL_CTX_get_session_cache_mode(ctx) & SSL_SESS_CACHE_SERVER);

    /* Default rotation: one hour, so sessions live two hours. */
    assert_int_equal(SSL_CTX_get_timeout(ctx), 7200);

    /* Only the intermediate AEAD suites with forward secrecy. */
    STACK_OF(SSL_CIPHER) *ciphers = SSL_CTX_get_ciphers(ctx);
    int n = sk_SSL_CIPHER_num(ciphers);
    assert_int_equal(n, 3 + 9);
    for (int i = 0; i < n; i++) {
        const char *name = SSL_CIPHER_get_name(sk_SSL_CIPHER_value(ciphers, i));
        assert_true(strstr(name, "GCM") || strstr(name, "CHACHA20"));
        assert_null(strstr(name, "CBC"));
    }
    assert_int_equal(ERR_peek_error(), 0);
    bw_tls_ctx_free(ctx);
    bw_tls_keys_free(&keys);
}

static void test_mismatched_key(void **state)
{
    (void)state;
    bw_listener_conf l = listener("127.0.0.1:8443", cert_path, other_key_path);
    bw_diag d;
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 1, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    print_message("diag: %s\n", d.lines[0]);
    const char *want = "breakwater.json: listeners[1].tls: certificate and private key do not "
                       "match (OpenSSL: ";
    assert_memory_equal(d.lines[0], want, strlen(want));
    assert_int_equal(d.lines[0][strlen(d.lines[0]) - 1], ')');
    /* Nothing left for the next SSL_get_error() of an unrelated connection. */
    assert_int_equal(ERR_peek_error(), 0);
    bw_diag_free(&d);
}

static void test_missing_and_invalid_files(void **state)
{
    (void)state;
    char missing[600], want[800];
    bw_diag d;
    snprintf(missing, sizeof(missing), "%s/nope.crt", tmpdir);

    bw_listener_conf l = listener("127.0.0.1:8443", missing, key_path);
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 2, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    print_message("diag: %s\n", d.lines[0]);
    snprintf(
        want, sizeof(want),
        "breakwater.json: listeners[2].tls.cert: cannot load certificate chain from %s: ", missing);
    assert_memory_equal(d.lines[0], want, strlen(want));
    assert_non_null(strstr(d.lines[0], "No such file"));
    assert_int_equal(ERR_peek_error(), 0);
    bw_diag_free(&d);

    l = listener("127.0.0.1:8443", garbage_path, key_path);
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 0, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    print_message("diag: %s\n", d.lines[0]);
    snprintf(want, sizeof(want),
             "breakwater.json: listeners[0].tls.cert: cannot load certificate chain from %s: ",
             garbage_path);
    assert_memory_equal(d.lines[0], want, strlen(want));
    bw_diag_free(&d);

    /* A certificate where the key should be. */
    l = listener("127.0.0.1:8443", cert_path, cert_path);
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 0, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    print_message("diag: %s\n", d.lines[0]);
    snprintf(want, sizeof(want),
             "breakwater.json: listeners[0].tls.key: cannot load private key from %s: ", cert_path);
    assert_memory_equal(d.lines[0], want, strlen(want));
    assert_int_equal(ERR_peek_error(), 0);
    bw_diag_free(&d);

    /* A passphrase-protected key fails at once instead of prompting on the terminal. */
    char enc_path[600];
    snprintf(enc_path, sizeof(enc_path), "%s/encrypted.key", tmpdir);
    BIO *kb = BIO_new_file(key_path, "r");
    EVP_PKEY *k = PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL);
    BIO_free(kb);
    assert_non_null(k);
    FILE *f = fopen(enc_path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, k, EVP_aes_128_cbc(), NULL, 0, NULL, "secret"), 1);
    fclose(f);
    EVP_PKEY_free(k);
    l = listener("127.0.0.1:8443", cert_path, enc_path);
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 0, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    print_message("diag: %s\n", d.lines[0]);
    snprintf(want, sizeof(want),
             "breakwater.json: listeners[0].tls.key: cannot load private key from %s: ", enc_path);
    assert_memory_equal(d.lines[0], want, strlen(want));
    assert_int_equal(ERR_peek_error(), 0);
    bw_diag_free(&d);

    /* A listener without TLS settings is refused, not crashed on. */
    l = listener("127.0.0.1:8443", NULL, NULL);
    bw_diag_init(&d);
    assert_null(bw_tls_ctx_new(&l, 3, "breakwater.json", NULL, &d, NULL));
    assert_int_equal(d.count, 1);
    bw_diag_free(&d);
}

static void alpn_case(SSL_CTX *sctx, const unsigned char *offer, unsigned int offer_len,
                      const char *expect)
{
    SSL_CTX *cctx = client_ctx(TLS1_2_VERSION, TLS1_3_VERSION);
    if (offer != NULL)
        assert_int_equal(SSL_CTX_set_alpn_protos(cctx, offer, offer_len), 0);
    conn_pair p = pair_new(cctx, sctx);
    assert_int_equal(handshake(&p), 0);
    const unsigned char *sel = NULL;
    unsigned int sel_len = 0;
    SSL_get0_alpn_selected(p.client, &sel, &sel_len);
    if (expect == NULL) {
        assert_int_equal(sel_len, 0);
    } else {
        assert_int_equal(sel_len, strlen(expect));
        assert_memory_equal(sel, expect, sel_len);
    }
    pair_free(&p);
    bw_tls_ctx_free(cctx);
}

static void test_alpn(void **state)
{
    (void)state;
    static const unsigned char h2_and_h11[] = "\x02h2\x08http/1.1";
    static const unsigned char h2_only[] = "\x02h2";
    static const unsigned char h11_then_h2[] = "\x08http/1.1\x02h2";
    static const unsigned char h10[] = "\x08http/1.0";
    SSL_CTX *sctx = good_ctx(NULL);

    alpn_case(sctx, h2_and_h11, sizeof(h2_and_h11) - 1, "http/1.1");
    alpn_case(sctx, h11_then_h2, sizeof(h11_then_h2) - 1, "http/1.1");
    /* Nothing we speak: no ALPN in the answer, and the handshake still succeeds. */
    alpn_case(sctx, h2_only, sizeof(h2_only) - 1, NULL);
    alpn_case(sctx, h10, sizeof(h10) - 1, NULL);
    alpn_case(sctx, NULL, 0, NULL);
    bw_tls_ctx_free(sctx);
}

/* Full handshake against a, then a resumption attempt against b; returns whether it resumed. */
static bool resumes_across(SSL_CTX *a, SSL_CTX *b, int version)
{
    SSL_CTX *cctx = client_ctx(version, version);
    conn_pair first = pair_new(cctx, a);
    assert_int_equal(handshake(&first), 0);
    assert_int_equal(SSL_version(first.client), version);
    assert_false(SSL_session_reused(first.client));
    SSL_SESSION *sess = SSL_get1_session(first.client);
    assert_non_null(sess);
    assert_true(SSL_SESSION_is_resumable(sess));
    pair_free(&first);

    conn_pair second = pair_new(cctx, b);
    assert_int_equal(SSL_set_session(second.client, sess), 1);
    assert_int_equal(handshake(&second), 0);
    bool reused = SSL_session_reused(second.client) && SSL_session_reused(second.server);
    pair_free(&second);
    SSL_SESSION_free(sess);
    bw_tls_ctx_free(cctx);
    return reused;
}

/* Workers share one context; a reload builds new contexts with the same keys. Either way, a
 * ticket issued by one must be accepted by the other. */
static void test_tickets_shared_between_contexts(void **state)
{
    (void)state;
    bw_tls_keys keys, other_keys;
    assert_int_equal(bw_tls_keys_generate(&keys), 0);
    assert_int_equal(bw_tls_keys_generate(&other_keys), 0);
    SSL_CTX *a = good_ctx(&keys);
    SSL_CTX *b = good_ctx(&keys);
    SSL_CTX *c = good_ctx(&other_keys);

    assert_true(resumes_across(a, a, TLS1_3_VERSION));
    assert_true(resumes_across(a, b, TLS1_3_VERSION));
    assert_true(resumes_across(b, a, TLS1_2_VERSION));
    assert_true(resumes_across(a, b, TLS1_2_VERSION));
    /* Different keys: a full handshake, not an error. */
    assert_false(resumes_across(a, c, TLS1_3_VERSION));
    assert_false(resumes_across(a, c, TLS1_2_VERSION));

    /* Same keys but another listener: its session id context differs, so no resumption. */
    bw_listener_conf l = listener("127.0.0.1:9443", cert_path, key_path);
    bw_diag d;
    bw_diag_init(&d);
    SSL_CTX *other_listener = bw_tls_ctx_new(&l, 1, "breakwater.json", &keys, &d, NULL);
    assert_non_null(other_listener);
    assert_false(resumes_across(a, other_listener, TLS1_3_VERSION));
    bw_diag_free(&d);

    bw_tls_ctx_free(other_listener);
    bw_tls_ctx_free(a);
    bw_tls_ctx_free(b);
    bw_tls_ctx_free(c);
    bw_tls_keys_free(&keys);
    bw_tls_keys_free(&other_keys);
    ERR_clear_error();
}

static void test_old_versions_refused(void **state)
{
    (void)state;
    SSL_CTX *sctx = good_ctx(NULL);
    int versions[] = {TLS1_VERSION, TLS1_1_VERSION};
    for (size_t i = 0; i < 2; i++) {
        SSL_CTX *cctx = client_ctx(TLS1_VERSION, versions[i]);
        conn_pair p = pair_new(cctx, sctx);
        ERR_clear_error();
        assert_int_equal(handshake(&p), -1);
        /* The server refused it; the client did offer. */
        assert_true(error_queue_has_reason(SSL_R_UNSUPPORTED_PROTOCOL));
        pair_free(&p);
        bw_tls_ctx_free(cctx);
    }

    /* TLS 1.2 without forward secrecy or AEAD: no shared cipher. */
    SSL_CTX *cctx = client_ctx(TLS1_2_VERSION, TLS1_2_VERSION);
    assert_int_equal(SSL_CTX_set_cipher_list(cctx, "AES128-SHA:ECDHE-ECDSA-AES128-SHA"), 1);
    conn_pair p = pair_new(cctx, sctx);
    assert_int_equal(handshake(&p), -1);
    assert_true(error_queue_has_reason(SSL_R_NO_SHARED_CIPHER));
    pair_free(&p);
    bw_tls_ctx_free(cctx);

    /* TLS 1.2 works, and the client's order decides (no server preference). */
    cctx = client_ctx(TLS1_2_VERSION, TLS1_2_VERSION);
    assert_int_equal(SSL_CTX_set_cipher_list(cctx, "ECDHE-ECDSA-CHACHA20-POLY1305:"
                                                   "ECDHE-ECDSA-AES128-GCM-SHA256"),
                     1);
    p = pair_new(cctx, sctx);
    assert_int_equal(handshake(&p), 0);
    assert_string_equal(SSL_get_cipher_name(p.server), "ECDHE-ECDSA-CHACHA20-POLY1305");
    pair_free(&p);
    bw_tls_ctx_free(cctx);
    bw_tls_ctx_free(sctx);
}

/* Live OpenSSL bytes held by n established, idle connections using sctx. */
static size_t idle_connections_bytes(SSL_CTX *sctx, SSL_CTX *cctx, conn_pair *pairs, size_t n)
{
    size_t before = live_bytes;
    for (size_t i = 0; i < n; i++) {
        pairs[i] = pair_new(cctx, sctx);
        assert_int_equal(handshake(&pairs[i]), 0);
        /* One request-sized exchange, then nothing: a keep-alive connection at rest. */
        char buf[64];
        assert_int_equal(SSL_write(pairs[i].client, "GET / HTTP/1.1\r\n\r\n", 18), 18);
        assert_int_equal(SSL_read(pairs[i].server, buf, sizeof(buf)), 18);
        assert_int_equal(SSL_write(pairs[i].server, "HTTP/1.1 200 OK\r\n\r\n", 19), 19);
        assert_int_equal(SSL_read(pairs[i].client, buf, sizeof(buf)), 19);
        int r = SSL_read(pairs[i].server, buf, sizeof(buf));
        assert_int_equal(SSL_get_error(pairs[i].server, r), SSL_ERROR_WANT_READ);
    }
    return live_bytes - before;
}

static void test_release_buffers_saves_memory(void **state)
{
    (void)state;
    enum { N = 64 };
    static conn_pair pairs[N];
    SSL_CTX *released = good_ctx(NULL);
    SSL_CTX *kept = good_ctx(NULL);
    SSL_CTX_clear_mode(kept, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX *cctx = client_ctx(TLS1_2_VERSION, TLS1_3_VERSION);

    size_t with_release = idle_connections_bytes(released, cctx, pairs, N);
    for (size_t i = 0; i < N; i++)
        pair_free(&pairs[i]);
    size_t without_release = idle_connections_bytes(kept, cctx, pairs, N);
    for (size_t i = 0; i < N; i++)
        pair_free(&pairs[i]);

    print_message("idle TLS 1.3 connection pair (client + server + BIO pair): %zu bytes with "
                  "SSL_MODE_RELEASE_BUFFERS on the server, %zu without; saved %zu per "
                  "connection\n",
                  with_release / N, without_release / N, (without_release - with_release) / N);
    assert_true(with_release < without_release);
    /* At least the server's read and write buffers (about 16 KiB each) are given back. */
    assert_true((without_release - with_release) / N > 16 * 1024);

    bw_tls_ctx_free(released);
    bw_tls_ctx_free(kept);
    bw_tls_ctx_free(cctx);
}

/* SAN matching: exact names case-insensitively, "*." wildcards over exactly one label. */
static void test_name_match(void **state)
{
    (void)state;
    static const struct {
        const char *pattern, *host;
        bool match;
    } cases[] = {
        {"example.com", "example.com", true},
        {"example.com", "EXAMPLE.com", true},
        {"example.com", "example.com.", true},
        {"example.com", "www.example.com", false},
        {"example.com", "example.co", false},
        {"example.com", "", false},
        {"*.example.com", "www.example.com", true},
        {"*.example.com", "WWW.Example.COM", true},
        {"*.example.com", "a.b.example.com", false},
        {"*.example.com", "example.com", false},
        {"*.example.com", ".example.com", false},
        {"*.example.com", "wwwexample.com", false},
        {"*.example.com", "www.example.com.", true},
        {"*.example.com", "www.example.org", false},
        {"w*.example.com", "www.example.com", false},
        {"*", "localhost", false},
        {"*.", "a.", false},
        {"localhost", "localhost", true},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        if (bw_tls_name_match(cases[i].pattern, cases[i].host) != cases[i].match)
            fail_msg("%s vs %s: expected %d", cases[i].pattern, cases[i].host, cases[i].match);
    }
    assert_false(bw_tls_name_match(NULL, "a"));
    assert_false(bw_tls_name_match("a", NULL));
}

/* The ratchet with an injected clock: keys change once per period, the two previous ones stay
 * findable, older ones are gone, and however a process's calls fall in time it derives the same
 * keys as every other process starting from the same state. */
static void test_ticket_ring_window(void **state)
{
    (void)state;
    unsigned char seed[32];
    bw_tls_ticket_ring a, b, c;
    unsigned char names[6][16];
    for (size_t i = 0; i < sizeof(seed); i++)
        seed[i] = (unsigned char)(i * 7 + 1);
    const int64_t origin = 50000, period = 1000;

    bw_tls_ticket_init(&a, period, origin, seed);
    b = a; /* what a forked worker inherits */
    assert_int_equal(a.n_keys, 1);
    assert_int_equal(bw_tls_ticket_find(&a, a.keys[0].name), 0);
    memcpy(names[0], a.keys[0].name, 16);

    /* Before the origin and within the first period nothing moves. */
    bw_tls_ticket_advance(&a, origin - 5000);
    bw_tls_ticket_advance(&a, origin + period - 1);
    assert_int_equal(a.epoch, 0);
    assert_memory_equal(a.keys[0].name, names[0], 16);

    for (int e = 1; e <= 5; e++) {
        bw_tls_ticket_advance(&a, origin + e * period + (e % 2 ? 0 : period / 2));
        assert_int_equal(a.epoch, (uint64_t)e);
        memcpy(names[e], a.keys[0].name, 16);
        assert_memory_not_equal(names[e], names[e - 1], 16);
        assert_int_equal(a.n_keys, e + 1 < BW_TLS_TICKET_KEYS ? e + 1 : BW_TLS_TICKET_KEYS);
        /* current, previous, the one before: accepted; anything older: refused. */
        for (int k = 0; k <= e; k++) {
            int want = e - k < BW_TLS_TICKET_KEYS ? e - k : -1;
            assert_int_equal(bw_tls_ticket_find(&a, names[k]), want);
        }
    }
    /* Going back in time does not resurrect anything. */
    bw_tls_ticket_advance(&a, origin);
    assert_int_equal(a.epoch, 5);

    /* A process that was idle the whole time jumps straight to the same keys. */
    bw_tls_ticket_advance(&b, origin + 5 * period + 10);
    assert_int_equal(b.epoch, 5);
    assert_memory_equal(b.keys, a.keys, sizeof(a.keys));
    assert_memory_equal(b.state, a.state, sizeof(a.state));

    /* Another seed gives unrelated keys. */
    seed[0] ^= 1;
    bw_tls_ticket_init(&c, period, origin, seed);
    bw_tls_ticket_advance(&c, origin + 5 * period);
    assert_memory_not_equal(c.keys[0].name, a.keys[0].name, 16);
    assert_memory_not_equal(c.keys[0].aes, a.keys[0].aes, 32);
    assert_int_equal(bw_tls_ticket_find(&c, a.keys[0].name), -1);

    /* A long pause (a thousand periods) is bounded work and leaves three keys. */
    bw_tls_ticket_advance(&a, origin + 1005 * period);
    assert_int_equal(a.epoch, 1005);
    assert_int_equal(a.n_keys, BW_TLS_TICKET_KEYS);
    assert_int_equal(bw_tls_ticket_find(&a, names[5]), -1);
}

int main(void)
{
    /* Must come before the first OpenSSL allocation to take effect. */
    CRYPTO_set_mem_functions(count_malloc, count_realloc, count_free);

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_generate),
        cmocka_unit_test(test_name_match),
        cmocka_unit_test(test_ticket_ring_window),
        cmocka_unit_test(test_library_version),
        cmocka_unit_test(test_good_context_policy),
        cmocka_unit_test(test_mismatched_key),
        cmocka_unit_test(test_missing_and_invalid_files),
        cmocka_unit_test(test_alpn),
        cmocka_unit_test(test_tickets_shared_between_contexts),
        cmocka_unit_test(test_old_versions_refused),
        cmocka_unit_test(test_release_buffers_saves_memory),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
