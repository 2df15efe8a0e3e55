/*
 * Client-side TLS to upstreams.
 *
 * One SSL_CTX per upstream and worker, built from the upstream's "tls" object: TLS 1.2 or newer,
 * the system's default verification paths or the configured CA bundle, an optional client
 * certificate for mutual TLS (checked against its key). Each connection gets its own SSL with
 * SNI and the name the certificate must carry: server_name when set, else the server's DNS name,
 * else its IP address (matched against the certificate's IP SANs).
 */
#include "breakwater/upstream_tls.h"

#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

static void ssl_error_text(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0)
        snprintf(buf, len, "unknown OpenSSL error");
    else
        ERR_error_string_n(e, buf, len);
    ERR_clear_error();
}

SSL_CTX *bw_upstream_tls_ctx_new(const bw_upstream_conf *u, char *err, size_t errlen)
{
    const bw_upstream_tls_conf *t = &u->tls;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char why[256];
    if (ctx == NULL) {
        ssl_error_text(why, sizeof(why));
        snprintf(err, errlen, "cannot create a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, t->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    int ok = t->ca ? SSL_CTX_load_verify_locations(ctx, t->ca, NULL)
                   : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
        ssl_error_text(why, sizeof(why));
        snprintf(err, errlen, "cannot load the CA bundle %s: %s", t->ca ? t->ca : "(system)", why);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (t->cert && t->key) {
        if (SSL_CTX_use_certificate_chain_file(ctx, t->cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, t->key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            ssl_error_text(why, sizeof(why));
            snprintf(err, errlen, "cannot use the client certificate %s with key %s: %s", t->cert,
                     t->key, why);
            SSL_CTX_free(ctx);
            return NULL;
        }
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    return ctx;
}

/* The name a server's certificate is checked against, or NULL for its IP address. */
static const char *verified_name(const bw_upstream_conf *u, const bw_server_conf *sc)
{
    if (u->tls.server_name)
        return u->tls.server_name;
    if (sc->host)
        return sc->host;
    /* A resolved server of a DNS-named upstream stands for the name it came from. */
    for (size_t i = 0; u->dynamic && i < u->n_servers; i++)
        if (u->servers[i].host)
            return u->servers[i].host;
    return NULL;
}

SSL *bw_upstream_tls_ssl_new(SSL_CTX *ctx, const bw_upstream_conf *u, const bw_server_conf *sc)
{
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL)
        return NULL;
    const char *name = verified_name(u, sc);
    if (name) {
        SSL_set_tlsext_host_name(ssl, name);
        if (u->tls.verify)
            SSL_set1_host(ssl, name);
    } else if (u->tls.verify) {
        char ip[64];
        bw_sockaddr_format(&sc->addr, ip, sizeof(ip));
        /* "1.2.3.4:443" or "[::1]:443" -> the bare address. */
        char *colon = strrchr(ip, ':');
        if (colon)
            *colon = '\0';
        const char *bare = ip;
        if (ip[0] == '[') {
            bare = ip + 1;
            char *close = strchr(ip, ']');
            if (close)
                *close = '\0';
        }
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), bare);
    }
    return ssl;
}

int bw_upstream_tls_failure(SSL *ssl, unsigned long ssl_err, char *buf, size_t len)
{
    long v = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
    if (v != X509_V_OK) {
        snprintf(buf, len, "certificate verify failed: %s", X509_verify_cert_error_string(v));
        ERR_clear_error();
        return (int)v;
    }
    if (ssl_err != 0) {
        char e[200];
        ERR_error_string_n(ssl_err, e, sizeof(e));
        snprintf(buf, len, "TLS handshake failed: %s", e);
    } else {
        snprintf(buf, len, "TLS handshake failed");
    }
    ERR_clear_error();
    return 0;
}
