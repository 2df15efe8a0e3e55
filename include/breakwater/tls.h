/*
 * TLS termination: one SSL_CTX per TLS listener, built by the master before fork so that every
 * worker shares the certificates and the configuration. TLS 1.2 and 1.3 only, Mozilla
 * "intermediate" ciphers, ALPN "http/1.1".
 *
 * A listener holds one or more certificates; each handshake gets the one whose SAN DNS names
 * match the client's SNI (exact names before wildcards, one RSA and one ECDSA at most, OpenSSL
 * picking between those two by what the client supports), the first certificate otherwise. A
 * certificate may carry a DER OCSP response that is stapled when the client asks.
 *
 * Session tickets are encrypted with keys that rotate every `ticket_rotate_ms` by a one-way
 * ratchet: every process steps the same secret forward at the same monotonic instants, so all
 * workers agree on the current key without sharing writable memory, and a key once stepped past
 * cannot be computed again from what remains in memory. The ratchet state lives in a
 * bw_tls_keys that the master keeps across reloads.
 */
#ifndef BREAKWATER_TLS_H
#define BREAKWATER_TLS_H

#include <stdint.h>

#include <openssl/ssl.h>

#include "breakwater/config.h"

/* Keys kept per ring: the current one encrypts, the two before it still decrypt (and the ticket
 * is then renewed), so a ticket is accepted for at least two rotation periods. The session
 * lifetime is set to exactly two periods, which refuses it afterwards. */
#define BW_TLS_TICKET_KEYS 3

typedef struct bw_tls_ticket_key {
    unsigned char name[16];
    unsigned char hmac[32];
    unsigned char aes[32];
} bw_tls_ticket_key;

/* The ticket keys of one rotation period length. Pure data: advanced by bw_tls_ticket_advance()
 * with an injected clock, so it is tested without OpenSSL handshakes or sleeps. */
typedef struct bw_tls_ticket_ring {
    uint64_t period_ms;
    int64_t origin_ms; /* CLOCK_MONOTONIC ms at which epoch 0 began */
    uint64_t epoch;    /* epoch of keys[0] */
    unsigned char state[32];
    bw_tls_ticket_key keys[BW_TLS_TICKET_KEYS]; /* [0] current, [1] previous, ... */
    unsigned n_keys;                            /* valid entries of keys[] */
    struct bw_tls_ticket_ring *next;
} bw_tls_ticket_ring;

/* Every ring of the process, one per distinct ticket_rotate_ms; kept by the master across
 * reloads and inherited by workers through fork. */
typedef struct bw_tls_keys {
    bw_tls_ticket_ring *rings;
} bw_tls_keys;

/* Starts an empty set (rings are created on first use). Returns 0, or -1 when the kernel's
 * random source is unusable. */
int bw_tls_keys_generate(bw_tls_keys *keys);
void bw_tls_keys_free(bw_tls_keys *keys);
/* Steps every ring to now_ms, forgetting keys older than BW_TLS_TICKET_KEYS epochs. */
void bw_tls_keys_advance(bw_tls_keys *keys, int64_t now_ms);

/* Ring logic, exported for the unit tests. seed is 32 random bytes. */
void bw_tls_ticket_init(bw_tls_ticket_ring *r, uint64_t period_ms, int64_t origin_ms,
                        const unsigned char seed[32]);
void bw_tls_ticket_advance(bw_tls_ticket_ring *r, int64_t now_ms);
/* Index in keys[] of the key called name, or -1 (unknown or too old: the ticket is refused). */
int bw_tls_ticket_find(const bw_tls_ticket_ring *r, const unsigned char name[16]);

/* True when the DNS name pattern (a SAN entry, "*.example.com" matching exactly one label)
 * matches host; case-insensitive, a trailing dot on host ignored. */
bool bw_tls_name_match(const char *pattern, const char *host);

/*
 * Builds a server context for one listener: loads every PEM chain and key, checks that they
 * match, loads OCSP responses, applies the protocol/cipher policy, ALPN and ticket keys. On
 * failure returns NULL and adds "FILE: listeners[i].tls...: message" lines (with OpenSSL's reason)
 * to diag. Problems that do not stop the certificate from being served (expired certificate, an
 * OCSP response that is not stapled) are added to warn when it is not NULL.
 */
SSL_CTX *bw_tls_ctx_new(const bw_listener_conf *l, size_t index, const char *config_path,
                        bw_tls_keys *keys, bw_diag *diag, bw_diag *warn);
/* Frees a context made by bw_tls_ctx_new() and what it holds. NULL is ignored. */
void bw_tls_ctx_free(SSL_CTX *ctx);

/* A fingerprint of the identity (device, inode, size, mtime, ctime) of every certificate, key
 * and OCSP file of cfg; it changes when any of them is replaced or rewritten. */
uint64_t bw_tls_files_stamp(const bw_config *cfg);
/* The shortest reload_check_ms of cfg's TLS listeners, 0 without TLS listeners. */
uint32_t bw_tls_reload_check_ms(const bw_config *cfg);

/* Version string of the linked OpenSSL, for -V. */
const char *bw_tls_library_version(void);

#endif
