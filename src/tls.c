/*
 * TLS termination policy: one OpenSSL server context per TLS listener.
 *
 * The master builds every SSL_CTX before it forks, so each worker inherits the same context,
 * certificate and session-ticket keys; a reload builds new contexts from the files on disk with
 * the same keys. Because tickets are encrypted with those shared keys, a client can resume its
 * session on whichever worker accepts its next connection, before and after a reload.
 *
 * The policy follows Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, AEAD ciphers with
 * forward secrecy, the client's cipher order, no compression, no renegotiation. ALPN accepts only
 * "http/1.1", the one protocol the proxy speaks. See docs/tls.md.
 */
#include "breakwater/tls.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

/* Mozilla intermediate (v5.7) TLS 1.2 ciphers, in Mozilla's order. */
static const char tls12_ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305";

/* OpenSSL's built-in TLS 1.3 suites, named explicitly so that a system-wide openssl.cnf cannot
 * change what the proxy offers. */
static const char tls13_suites[] =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

static const char tls_groups[] = "X25519:prime256v1:secp384r1";

/* ALPN wire form of the only application protocol offered. */
static const unsigned char alpn_http11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};

int bw_tls_keys_generate(bw_tls_keys *keys)
{
    size_t got = 0;
    while (got < sizeof(keys->bytes)) {
        ssize_t n = getrandom(keys->bytes + got, sizeof(keys->bytes) - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

const char *bw_tls_library_version(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}

/*
 * Empties OpenSSL's per-thread error queue and describes its oldest entry, which is the root
 * cause ("No such file or directory", "key values mismatch"); later entries only say which
 * layer passed the failure up. Draining matters: a stale entry would otherwise be reported by
 * the next unrelated SSL_get_error() on a connection in this process.
 */
static const char *drain_openssl_errors(char *buf, size_t len)
{
    const char *data = NULL;
    int flags = 0;
    unsigned long first = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);

    if (first == 0) {
        snprintf(buf, len, "unknown error");
    } else {
        const char *reason = ERR_reason_error_string(first);
        char code[128];
        if (ERR_SYSTEM_ERROR(first)) {
            /* errno from fopen() and friends; the data repeats the path already quoted. */
            snprintf(buf, len, "%s", strerror(ERR_GET_REASON(first)));
            ERR_clear_error();
            return buf;
        }
        if (reason == NULL) {
            ERR_error_string_n(first, code, sizeof(code));
            reason = code;
        }
        if (data != NULL && (flags & ERR_TXT_STRING) && data[0] != '\0')
            snprintf(buf, len, "%s (%s)", reason, data);
        else
            snprintf(buf, len, "%s", reason);
    }
    ERR_clear_error();
    return buf;
}

/*
 * The ALPN choice. Only "http/1.1" is accepted. A client that offers nothing the proxy speaks
 * (for example only "h2") gets no ALPN extension back rather than a fatal
 * no_application_protocol alert (RFC 7301 section 3.2 allows both): the handshake completes and
 * the client either speaks HTTP/1.1 or gives up itself, which is what browsers and curl expect
 * from an HTTP/1.1-only server.
 */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    unsigned int i = 0;
    (void)ssl;
    (void)arg;

    while (i < inlen) {
        unsigned int plen = in[i];
        if (plen == 0 || plen > inlen - i - 1)
            break; /* malformed list: ignore the rest, as if not offered */
        if (plen == sizeof(alpn_http11) - 1 && memcmp(in + i + 1, alpn_http11 + 1, plen) == 0) {
            *out = in + i + 1;
            *outlen = (unsigned char)plen;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + plen;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/* An encrypted key would make OpenSSL prompt on the terminal; a daemon must fail instead. */
static int no_passphrase(char *buf, int size, int rwflag, void *userdata)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)userdata;
    return 0;
}

/*
 * Key-check failures that mean "this key is not the certificate's", as opposed to "this file
 * holds no usable key".
 */
static bool is_key_mismatch(unsigned long e)
{
    if (ERR_GET_LIB(e) != ERR_LIB_X509)
        return false;
    return ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH ||
           ERR_GET_REASON(e) == X509_R_KEY_TYPE_MISMATCH ||
           ERR_GET_REASON(e) == X509_R_UNKNOWN_KEY_TYPE;
}

/*
 * The session id context scopes resumption: a session (ticket or cached id) is only resumed on
 * a listener with the same context. Deriving it from the listener address keeps resumption
 * working across workers and reloads of that listener, while a ticket issued for one listener's
 * certificate is never accepted on another listener that shares the ticket keys.
 */
static int set_session_id_context(SSL_CTX *ctx, const bw_listener_conf *l)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    char label[512];
    int n = snprintf(label, sizeof(label), "breakwater listener %s", l->address ? l->address : "");

    if (n < 0)
        return -1;
    if (EVP_Digest(label, strlen(label), md, &mdlen, EVP_sha256(), NULL) != 1)
        return -1;
    if (mdlen > SSL_MAX_SID_CTX_LENGTH)
        mdlen = SSL_MAX_SID_CTX_LENGTH;
    return SSL_CTX_set_session_id_context(ctx, md, mdlen) == 1 ? 0 : -1;
}

SSL_CTX *bw_tls_ctx_new(const bw_listener_conf *l, size_t index, const char *config_path,
                        const bw_tls_keys *keys, bw_diag *diag)
{
    const char *file = config_path ? config_path : "(config)";
    char why[512];
    SSL_CTX *ctx;

    /* Whatever an earlier caller left behind must not be blamed on this listener. */
    ERR_clear_error();

    if (l == NULL || !l->tls_enabled || l->tls.cert == NULL || l->tls.key == NULL) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: both \"cert\" and \"key\" are required", file,
                    index);
        return NULL;
    }

    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot create a TLS context (OpenSSL: %s)", file,
                    index, drain_openssl_errors(why, sizeof(why)));
        return NULL;
    }

    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, tls12_ciphers) != 1 ||
        SSL_CTX_set_ciphersuites(ctx, tls13_suites) != 1 ||
        SSL_CTX_set1_groups_list(ctx, tls_groups) != 1 || SSL_CTX_set_dh_auto(ctx, 1) != 1) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot apply the TLS policy (OpenSSL: %s)", file,
                    index, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }

    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    /* Mozilla intermediate: every offered cipher is strong, so the client (which knows whether
     * it has AES hardware) picks. Tickets must stay on for resumption across workers. */
    SSL_CTX_clear_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
    /*
     * RELEASE_BUFFERS frees the 16 KiB+ read and write buffers of a connection while it is idle
     * (measured: docs/tls.md), which dominates memory with many keep-alive clients.
     * ACCEPT_MOVING_WRITE_BUFFER because libevent may retry a write from a different address.
     */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (SSL_CTX_use_certificate_chain_file(ctx, l->tls.cert) != 1) {
        bw_diag_add(diag, "%s: listeners[%zu].tls.cert: cannot load certificate chain from %s: %s",
                    file, index, l->tls.cert, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, l->tls.key, SSL_FILETYPE_PEM) != 1) {
        /* OpenSSL 3 already compares the key with the certificate here. */
        if (is_key_mismatch(ERR_peek_last_error()) || is_key_mismatch(ERR_peek_error()))
            bw_diag_add(diag,
                        "%s: listeners[%zu].tls: certificate and private key do not match "
                        "(OpenSSL: %s)",
                        file, index, drain_openssl_errors(why, sizeof(why)));
        else
            bw_diag_add(diag, "%s: listeners[%zu].tls.key: cannot load private key from %s: %s",
                        file, index, l->tls.key, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        bw_diag_add(diag,
                    "%s: listeners[%zu].tls: certificate and private key do not match "
                    "(OpenSSL: %s)",
                    file, index, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }

    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);

    /*
     * Tickets carry resumption across workers. The per-process cache only serves TLS 1.2 clients
     * without ticket support that come back to the same worker, so it is kept small: each worker
     * holds its own copy after fork.
     */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    SSL_CTX_sess_set_cache_size(ctx, 4096);
    if (set_session_id_context(ctx, l) < 0) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot set the session id context (OpenSSL: %s)",
                    file, index, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    /* Without shared keys every context would invent its own, and a ticket would only resume on
     * the worker generation that issued it. */
    if (keys != NULL &&
        SSL_CTX_set_tlsext_ticket_keys(ctx, (void *)keys->bytes, sizeof(keys->bytes)) != 1) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot set session ticket keys (OpenSSL: %s)",
                    file, index, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }

    ERR_clear_error();
    return ctx;

fail:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}
