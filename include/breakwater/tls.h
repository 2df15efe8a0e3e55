/*
 * TLS termination: one SSL_CTX per TLS listener, built by the master before fork so that every
 * worker shares the certificate, the configuration and the session-ticket keys (resumption works
 * whichever worker a client lands on). TLS 1.2 and 1.3 only, Mozilla "intermediate" ciphers,
 * ALPN "http/1.1". The ticket keys live in a bw_tls_keys that the master keeps across reloads.
 */
#ifndef BREAKWATER_TLS_H
#define BREAKWATER_TLS_H

#include <openssl/ssl.h>

#include "breakwater/config.h"

typedef struct bw_tls_keys {
    unsigned char bytes[80]; /* OpenSSL ticket key block: 16 name + 32 HMAC + 32 AES */
} bw_tls_keys;

/* Fills keys from the kernel's random source. Returns 0 or -1. */
int bw_tls_keys_generate(bw_tls_keys *keys);

/*
 * Builds a server context for one listener: loads the PEM chain and key, checks that they match,
 * applies the protocol/cipher policy, ALPN and the ticket keys. On failure returns NULL and adds
 * "FILE: listeners[i].tls: message" lines (with OpenSSL's reason) to diag.
 */
SSL_CTX *bw_tls_ctx_new(const bw_listener_conf *l, size_t index, const char *config_path,
                        const bw_tls_keys *keys, bw_diag *diag);

/* Version string of the linked OpenSSL, for -V. */
const char *bw_tls_library_version(void);

#endif
