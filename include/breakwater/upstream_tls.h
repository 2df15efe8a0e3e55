/*
 * TLS (and mutual TLS) from the proxy to an upstream: the client context an upstream's "tls"
 * object describes, one SSL per connection with SNI and the name to verify, and a readable
 * reason when a handshake fails. Verification is on unless the operator turns it off: the
 * certificate must chain to "ca" (or the system trust store) and match "server_name", or the
 * server's host name, or its IP address.
 */
#ifndef BREAKWATER_UPSTREAM_TLS_H
#define BREAKWATER_UPSTREAM_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

#include "breakwater/config.h"

/* Builds the client context of u (u->tls.enabled). NULL with a reason in err on failure. */
SSL_CTX *bw_upstream_tls_ctx_new(const bw_upstream_conf *u, char *err, size_t errlen);

/* A new client SSL for one connection to server sc of u: SNI and verified name set. */
SSL *bw_upstream_tls_ssl_new(SSL_CTX *ctx, const bw_upstream_conf *u, const bw_server_conf *sc);

/*
 * Why the handshake on ssl failed, for the log and /upstreams ("certificate verify failed:
 * self-signed certificate", ...). Returns the X509 verification code (> 0) when verification
 * failed, 0 otherwise; the OpenSSL error queue is cleared.
 */
int bw_upstream_tls_failure(SSL *ssl, unsigned long ssl_err, char *buf, size_t len);

#endif
