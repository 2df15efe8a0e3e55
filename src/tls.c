/*
 * TLS termination policy: one OpenSSL server context per TLS listener.
 *
 * The master builds every SSL_CTX before it forks, so each worker inherits the same context and
 * certificates; a reload (SIGHUP, or a certificate file that changed on disk) builds new
 * contexts from the files on disk. A listener may hold several certificates: the certificate
 * callback picks, per handshake, the ones whose SAN DNS names match the client's SNI and loads
 * them into that connection (at most one per key type, so OpenSSL chooses RSA or ECDSA by what the
 * client supports), the first certificate when nothing matches. OCSP responses are read, checked
 * against their certificate and stapled from memory.
 *
 * Session tickets are encrypted with keys derived from a ratchet (see bw_tls_ticket_advance):
 * every process holds the same state and steps it at the same monotonic instants, so a ticket
 * issued by one worker is accepted by every other, before and after a reload, while keys older
 * than BW_TLS_TICKET_KEYS periods are gone for good.
 *
 * The policy follows Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, AEAD ciphers with
 * forward secrecy, the client's cipher order, no compression, no renegotiation. ALPN accepts only
 * "http/1.1", the one protocol the proxy speaks. See docs/tls.md.
 */
#include "breakwater/tls.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ocsp.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

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

static int fill_random(unsigned char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = getrandom(buf + got, len - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

static int64_t tls_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* SHA-256 over a label and the ratchet state; the building block of the ratchet. */
static void ratchet_hash(const char *label, const unsigned char state[32], unsigned char out[32])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned int n = 0;
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(md, label, strlen(label)) != 1 || EVP_DigestUpdate(md, state, 32) != 1 ||
        EVP_DigestFinal_ex(md, out, &n) != 1) {
        /* SHA-256 does not fail short of memory exhaustion; a zero key would be worse than a
         * key nobody else derives, so fall back to fresh randomness (tickets then only resume
         * in this process). */
        if (fill_random(out, 32) < 0)
            RAND_bytes(out, 32);
    }
    EVP_MD_CTX_free(md);
}

static void ratchet_key(const unsigned char state[32], bw_tls_ticket_key *k)
{
    unsigned char a[32];
    ratchet_hash("breakwater ticket name+hmac", state, a);
    memcpy(k->name, a, sizeof(k->name));
    ratchet_hash("breakwater ticket hmac", state, k->hmac);
    ratchet_hash("breakwater ticket aes", state, k->aes);
    OPENSSL_cleanse(a, sizeof(a));
}

void bw_tls_ticket_init(bw_tls_ticket_ring *r, uint64_t period_ms, int64_t origin_ms,
                        const unsigned char seed[32])
{
    memset(r, 0, sizeof(*r));
    r->period_ms = period_ms ? period_ms : 1;
    r->origin_ms = origin_ms;
    memcpy(r->state, seed, sizeof(r->state));
    ratchet_key(r->state, &r->keys[0]);
    r->n_keys = 1;
}

/*
 * Steps the ratchet to the epoch that contains now_ms: state(e+1) = H(state(e)), key(e) derived
 * from state(e) by other labels. Only the state of the newest epoch is kept, so keys older than
 * the BW_TLS_TICKET_KEYS kept in the ring cannot be derived again by anyone reading this
 * process's memory later: past tickets stay secret. Every process that started from the same
 * state and origin computes the same keys, whenever it happens to call this.
 */
void bw_tls_ticket_advance(bw_tls_ticket_ring *r, int64_t now_ms)
{
    if (now_ms <= r->origin_ms)
        return;
    uint64_t target = (uint64_t)(now_ms - r->origin_ms) / r->period_ms;
    while (r->epoch < target) {
        unsigned char next[32];
        ratchet_hash("breakwater ticket ratchet", r->state, next);
        memcpy(r->state, next, sizeof(r->state));
        OPENSSL_cleanse(next, sizeof(next));
        memmove(&r->keys[1], &r->keys[0], sizeof(r->keys[0]) * (BW_TLS_TICKET_KEYS - 1));
        ratchet_key(r->state, &r->keys[0]);
        if (r->n_keys < BW_TLS_TICKET_KEYS)
            r->n_keys++;
        r->epoch++;
    }
    OPENSSL_cleanse(&r->keys[r->n_keys], sizeof(r->keys[0]) * (BW_TLS_TICKET_KEYS - r->n_keys));
}

int bw_tls_ticket_find(const bw_tls_ticket_ring *r, const unsigned char name[16])
{
    for (unsigned i = 0; i < r->n_keys; i++)
        if (CRYPTO_memcmp(r->keys[i].name, name, sizeof(r->keys[i].name)) == 0)
            return (int)i;
    return -1;
}

int bw_tls_keys_generate(bw_tls_keys *keys)
{
    unsigned char probe[1];
    keys->rings = NULL;
    return fill_random(probe, sizeof(probe));
}

void bw_tls_keys_free(bw_tls_keys *keys)
{
    while (keys->rings) {
        bw_tls_ticket_ring *r = keys->rings;
        keys->rings = r->next;
        OPENSSL_cleanse(r, sizeof(*r));
        free(r);
    }
}

void bw_tls_keys_advance(bw_tls_keys *keys, int64_t now_ms)
{
    for (bw_tls_ticket_ring *r = keys->rings; r; r = r->next)
        bw_tls_ticket_advance(r, now_ms);
}

/* The ring for one period length, created (from fresh randomness, epoch 0 starting now) when no
 * listener used that length before. Rings are never freed before the process ends, so a context
 * may keep a pointer to its ring. */
static bw_tls_ticket_ring *ring_for(bw_tls_keys *keys, uint64_t period_ms)
{
    for (bw_tls_ticket_ring *r = keys->rings; r; r = r->next)
        if (r->period_ms == period_ms)
            return r;
    unsigned char seed[32];
    bw_tls_ticket_ring *r = calloc(1, sizeof(*r));
    if (r == NULL || fill_random(seed, sizeof(seed)) < 0) {
        free(r);
        return NULL;
    }
    bw_tls_ticket_init(r, period_ms, tls_mono_ms(), seed);
    OPENSSL_cleanse(seed, sizeof(seed));
    r->next = keys->rings;
    keys->rings = r;
    return r;
}

/* ---- certificate names ---- */

bool bw_tls_name_match(const char *pattern, const char *host)
{
    size_t hl, pl;
    if (pattern == NULL || host == NULL || host[0] == '\0')
        return false;
    hl = strlen(host);
    if (hl > 0 && host[hl - 1] == '.')
        hl--;
    pl = strlen(pattern);
    if (pl >= 2 && pattern[0] == '*' && pattern[1] == '.') {
        /* "*.example.com": the host's first label is any non-empty label, the rest equal. */
        const char *dot = memchr(host, '.', hl);
        if (dot == NULL || dot == host)
            return false;
        size_t rest = hl - (size_t)(dot - host);
        if (rest != pl - 1 || rest < 2)
            return false;
        return strncasecmp(dot, pattern + 1, rest) == 0;
    }
    if (memchr(pattern, '*', pl) != NULL)
        return false; /* partial wildcards ("w*.example.com") are not honoured (RFC 6125 6.4.3) */
    return pl == hl && strncasecmp(pattern, host, hl) == 0;
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

/* ---- server contexts ---- */

/* One loaded certificate of a listener, shared read-only by every connection. */
typedef struct tls_cert {
    X509 *x509;
    EVP_PKEY *pkey;
    STACK_OF(X509) * chain; /* intermediates, without the leaf */
    int kind;               /* EVP_PKEY_get_base_id(): one certificate per kind per handshake */
    char **names;           /* SAN DNS names (the subject CN when there is none) */
    size_t n_names;
    unsigned char *ocsp; /* DER response to staple, NULL when none */
    size_t ocsp_len;
    time_t ocsp_next_update; /* 0 when the response has no nextUpdate */
} tls_cert;

/* What a server SSL_CTX carries besides OpenSSL's own state, as its app data. */
typedef struct tls_server {
    bw_tls_ticket_ring *ring; /* owned by the process's bw_tls_keys; NULL: OpenSSL's own keys */
    tls_cert *certs;
    size_t n_certs;
} tls_server;

#define MAX_OCSP_BYTES (1024 * 1024)
#define MAX_PICKS 8

static void cert_clear(tls_cert *c)
{
    X509_free(c->x509);
    EVP_PKEY_free(c->pkey);
    if (c->chain)
        sk_X509_pop_free(c->chain, X509_free);
    for (size_t i = 0; i < c->n_names; i++)
        free(c->names[i]);
    free(c->names);
    free(c->ocsp);
    memset(c, 0, sizeof(*c));
}

static void server_free(tls_server *srv)
{
    if (srv == NULL)
        return;
    for (size_t i = 0; i < srv->n_certs; i++)
        cert_clear(&srv->certs[i]);
    free(srv->certs);
    free(srv);
}

void bw_tls_ctx_free(SSL_CTX *ctx)
{
    if (ctx == NULL)
        return;
    server_free(SSL_CTX_get_app_data(ctx));
    SSL_CTX_set_app_data(ctx, NULL);
    SSL_CTX_free(ctx);
}

static int add_name(tls_cert *c, const char *s, size_t len)
{
    if (len == 0 || memchr(s, '\0', len) != NULL)
        return 0; /* an embedded NUL is an attack on name matching, never a name */
    char **nn = realloc(c->names, (c->n_names + 1) * sizeof(*nn));
    if (nn == NULL)
        return -1;
    c->names = nn;
    c->names[c->n_names] = strndup(s, len);
    if (c->names[c->n_names] == NULL)
        return -1;
    c->n_names++;
    return 0;
}

/* The DNS names the certificate is valid for: SAN dNSName entries, else the subject CN. */
static int collect_names(tls_cert *c)
{
    GENERAL_NAMES *gens = X509_get_ext_d2i(c->x509, NID_subject_alt_name, NULL, NULL);
    int rc = 0;
    for (int i = 0; gens != NULL && i < sk_GENERAL_NAME_num(gens) && rc == 0; i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
        if (g->type != GEN_DNS)
            continue;
        rc = add_name(c, (const char *)ASN1_STRING_get0_data(g->d.dNSName),
                      (size_t)ASN1_STRING_length(g->d.dNSName));
    }
    GENERAL_NAMES_free(gens);
    if (rc == 0 && c->n_names == 0) {
        const X509_NAME *subj = X509_get_subject_name(c->x509);
        int idx = X509_NAME_get_index_by_NID(subj, NID_commonName, -1);
        if (idx >= 0) {
            unsigned char *utf8 = NULL;
            int n = ASN1_STRING_to_UTF8(&utf8,
                                        X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, idx)));
            if (n > 0)
                rc = add_name(c, (const char *)utf8, (size_t)n);
            OPENSSL_free(utf8);
        }
    }
    return rc;
}

static void format_time(const ASN1_TIME *t, char *buf, size_t len)
{
    struct tm tm;
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1 ||
        strftime(buf, len, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
        snprintf(buf, len, "(unreadable date)");
}

static bool is_wildcard(const char *name)
{
    return name[0] == '*';
}

/* Appends to pick the certificates that serve host, exact names before wildcards, the first of
 * each key kind only. Returns the number picked. */
static size_t pick_certs(const tls_server *srv, const char *host, size_t pick[MAX_PICKS])
{
    size_t n = 0;
    if (host == NULL)
        return 0;
    for (int wild = 0; wild < 2; wild++) {
        for (size_t i = 0; i < srv->n_certs && n < MAX_PICKS; i++) {
            const tls_cert *c = &srv->certs[i];
            bool taken = false;
            for (size_t k = 0; k < n; k++)
                taken |= srv->certs[pick[k]].kind == c->kind;
            if (taken)
                continue;
            for (size_t j = 0; j < c->n_names; j++) {
                if (is_wildcard(c->names[j]) == (wild == 1) &&
                    bw_tls_name_match(c->names[j], host)) {
                    pick[n++] = i;
                    break;
                }
            }
        }
    }
    return n;
}

/*
 * The certificate callback runs after the ClientHello is parsed and before the cipher and the
 * signature algorithm are chosen. It replaces the connection's certificates with the ones that
 * serve the SNI name (or the default's first name), at most one per key type, and OpenSSL then
 * picks among them by the client's signature algorithms and ciphers: an ECDSA-capable client
 * gets the ECDSA certificate, an RSA-only one the RSA certificate.
 */
static int select_cert(SSL *ssl, void *arg)
{
    const tls_server *srv = arg;
    size_t pick[MAX_PICKS];
    size_t n;

    if (srv == NULL || srv->n_certs <= 1)
        return 1;
    n = pick_certs(srv, SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name), pick);
    if (n == 0 && srv->certs[0].n_names > 0)
        n = pick_certs(srv, srv->certs[0].names[0], pick);
    if (n == 0 || (n == 1 && pick[0] == 0))
        return 1; /* the context already holds the default certificate */
    SSL_certs_clear(ssl);
    for (size_t i = 0; i < n; i++) {
        const tls_cert *c = &srv->certs[pick[i]];
        if (SSL_use_cert_and_key(ssl, c->x509, c->pkey, c->chain, 1) != 1)
            return 0;
    }
    return 1;
}

/* Staples the OCSP response of the certificate OpenSSL chose, if it has a current one. */
static int staple_ocsp(SSL *ssl, void *arg)
{
    const tls_server *srv = arg;
    X509 *chosen = SSL_get_certificate(ssl);
    if (srv == NULL || chosen == NULL)
        return SSL_TLSEXT_ERR_NOACK;
    for (size_t i = 0; i < srv->n_certs; i++) {
        const tls_cert *c = &srv->certs[i];
        if (c->x509 != chosen)
            continue;
        if (c->ocsp == NULL || (c->ocsp_next_update != 0 && time(NULL) > c->ocsp_next_update))
            return SSL_TLSEXT_ERR_NOACK;
        unsigned char *copy = OPENSSL_memdup(c->ocsp, c->ocsp_len);
        if (copy == NULL)
            return SSL_TLSEXT_ERR_NOACK;
        if (SSL_set_tlsext_status_ocsp_resp(ssl, copy, (long)c->ocsp_len) != 1) {
            OPENSSL_free(copy);
            return SSL_TLSEXT_ERR_NOACK;
        }
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/*
 * Ticket encryption and decryption with the ring's keys. A ticket under the current key
 * resumes; under one of the previous keys it resumes and is renewed (re-issued under the
 * current key); any other ticket is ignored and the handshake is a full one.
 */
static int ticket_key_cb(SSL *ssl, unsigned char key_name[16], unsigned char iv[EVP_MAX_IV_LENGTH],
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    const tls_server *srv = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    OSSL_PARAM params[3];
    const bw_tls_ticket_key *k;
    int idx = 0;

    if (srv == NULL || srv->ring == NULL)
        return 0;
    bw_tls_ticket_advance(srv->ring, tls_mono_ms());
    if (enc) {
        if (RAND_bytes(iv, 16) != 1)
            return 0;
        k = &srv->ring->keys[0];
        memcpy(key_name, k->name, sizeof(k->name));
    } else {
        idx = bw_tls_ticket_find(srv->ring, key_name);
        if (idx < 0)
            return 0;
        k = &srv->ring->keys[idx];
    }
    params[0] =
        OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)k->hmac, sizeof(k->hmac));
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (EVP_MAC_CTX_set_params(hctx, params) != 1)
        return enc ? 0 : -1;
    if (enc) {
        if (EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) != 1)
            return 0;
        return 1;
    }
    if (EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv) != 1)
        return -1;
    return idx == 0 ? 1 : 2;
}

/* Reads at most MAX_OCSP_BYTES of a file. Returns 0, or -1 with the reason in why. */
static int read_small_file(const char *path, unsigned char **out, size_t *len, char *why,
                           size_t whylen)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    *out = NULL;
    if (f == NULL) {
        snprintf(why, whylen, "cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= 0 ||
        st.st_size > MAX_OCSP_BYTES) {
        snprintf(why, whylen, "%s is empty, not a regular file or larger than %d bytes", path,
                 MAX_OCSP_BYTES);
        fclose(f);
        return -1;
    }
    *out = malloc((size_t)st.st_size);
    if (*out == NULL || fread(*out, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        snprintf(why, whylen, "cannot read %s: %s", path, *out ? "short read" : "out of memory");
        free(*out);
        *out = NULL;
        fclose(f);
        return -1;
    }
    fclose(f);
    *len = (size_t)st.st_size;
    return 0;
}

/*
 * Checks an OCSP response against its certificate: it must parse, be "successful", hold a
 * response for this certificate (issuer and serial when the issuer is in the chain, else the
 * serial) and be current. Returns NULL when it may be stapled, else the reason.
 */
static const char *ocsp_check(tls_cert *c, const unsigned char *der, size_t len, char *why,
                              size_t whylen, bool *revoked)
{
    const unsigned char *p = der;
    OCSP_RESPONSE *resp = d2i_OCSP_RESPONSE(NULL, &p, (long)len);
    OCSP_BASICRESP *bs = NULL;
    OCSP_CERTID *id = NULL;
    const char *res = NULL;
    int status, reason;
    ASN1_GENERALIZEDTIME *rev = NULL, *thisupd = NULL, *nextupd = NULL;
    X509 *issuer = NULL;
    int idx = -1;

    *revoked = false;
    if (resp == NULL || p != der + len) {
        snprintf(why, whylen, "not a DER OCSP response");
        res = why;
        goto out;
    }
    status = OCSP_response_status(resp);
    if (status != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
        snprintf(why, whylen, "the responder answered \"%s\"", OCSP_response_status_str(status));
        res = why;
        goto out;
    }
    bs = OCSP_response_get1_basic(resp);
    if (bs == NULL) {
        snprintf(why, whylen, "not a basic OCSP response");
        res = why;
        goto out;
    }
    for (int i = 0; i < sk_X509_num(c->chain) && issuer == NULL; i++)
        if (X509_check_issued(sk_X509_value(c->chain, i), c->x509) == X509_V_OK)
            issuer = sk_X509_value(c->chain, i);
    /* Each entry names its certificate by a hash of the issuer under an algorithm of the
     * responder's choosing (SHA-1 usually, SHA-256 sometimes) and the serial number. */
    for (int i = 0; i < OCSP_resp_count(bs) && idx < 0; i++) {
        ASN1_INTEGER *serial = NULL;
        ASN1_OBJECT *alg = NULL;
        OCSP_CERTID *cid = (OCSP_CERTID *)OCSP_SINGLERESP_get0_id(OCSP_resp_get0(bs, i));
        if (OCSP_id_get0_info(NULL, &alg, NULL, &serial, cid) != 1)
            continue;
        if (issuer == NULL) {
            if (ASN1_INTEGER_cmp(serial, X509_get0_serialNumber(c->x509)) == 0)
                idx = i;
            continue;
        }
        const EVP_MD *md = EVP_get_digestbyobj(alg);
        if (md == NULL)
            continue;
        OCSP_CERTID_free(id);
        id = OCSP_cert_to_id(md, c->x509, issuer);
        if (id != NULL && OCSP_id_cmp(id, cid) == 0)
            idx = i;
    }
    if (idx < 0) {
        snprintf(why, whylen, "it is for another certificate (no entry for this certificate's %s)",
                 issuer ? "issuer and serial number" : "serial number");
        res = why;
        goto out;
    }
    status = OCSP_single_get0_status(OCSP_resp_get0(bs, idx), &reason, &rev, &thisupd, &nextupd);
    if (status == V_OCSP_CERTSTATUS_UNKNOWN) {
        snprintf(why, whylen, "the responder does not know the certificate (status \"unknown\")");
        res = why;
        goto out;
    }
    if (OCSP_check_validity(thisupd, nextupd, 300, -1) != 1) {
        char t[64];
        if (nextupd != NULL && X509_cmp_current_time(nextupd) < 0) {
            format_time(nextupd, t, sizeof(t));
            snprintf(why, whylen, "it has expired (next update %s)", t);
        } else {
            format_time(thisupd, t, sizeof(t));
            snprintf(why, whylen, "it is not valid yet or malformed (this update %s)", t);
        }
        res = why;
        goto out;
    }
    *revoked = status == V_OCSP_CERTSTATUS_REVOKED;
    c->ocsp_next_update = 0;
    if (nextupd != NULL) {
        struct tm tm;
        if (ASN1_TIME_to_tm(nextupd, &tm) == 1)
            c->ocsp_next_update = timegm(&tm);
    }
out:
    OCSP_CERTID_free(id);
    OCSP_BASICRESP_free(bs);
    OCSP_RESPONSE_free(resp);
    ERR_clear_error();
    return res;
}

/* Loads one certificate entry; where is "listeners[i].tls" or "...certificates[j]". */
static int cert_load(tls_cert *c, const bw_tls_cert_conf *cc, const char *file, const char *where,
                     bw_diag *diag, bw_diag *warn)
{
    char why[512];
    STACK_OF(X509) *chain = NULL;
    SSL_CTX *tmp = SSL_CTX_new(TLS_server_method());

    ERR_clear_error();
    if (tmp == NULL) {
        bw_diag_add(diag, "%s: %s: cannot create a TLS context (OpenSSL: %s)", file, where,
                    drain_openssl_errors(why, sizeof(why)));
        return -1;
    }
    SSL_CTX_set_default_passwd_cb(tmp, no_passphrase);
    if (SSL_CTX_use_certificate_chain_file(tmp, cc->cert) != 1) {
        bw_diag_add(diag, "%s: %s.cert: cannot load certificate chain from %s: %s", file, where,
                    cc->cert, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(tmp, cc->key, SSL_FILETYPE_PEM) != 1) {
        /* OpenSSL 3 already compares the key with the certificate here. */
        if (is_key_mismatch(ERR_peek_last_error()) || is_key_mismatch(ERR_peek_error()))
            bw_diag_add(diag, "%s: %s: certificate and private key do not match (OpenSSL: %s)",
                        file, where, drain_openssl_errors(why, sizeof(why)));
        else
            bw_diag_add(diag, "%s: %s.key: cannot load private key from %s: %s", file, where,
                        cc->key, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    if (SSL_CTX_check_private_key(tmp) != 1) {
        bw_diag_add(diag, "%s: %s: certificate and private key do not match (OpenSSL: %s)", file,
                    where, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    /* Owned references only: the scratch context is freed below. */
    X509 *leaf = SSL_CTX_get0_certificate(tmp);
    EVP_PKEY *pkey = SSL_CTX_get0_privatekey(tmp);
    if (leaf == NULL || pkey == NULL || X509_up_ref(leaf) != 1) {
        bw_diag_add(diag, "%s: %s: cannot keep the loaded certificate", file, where);
        goto fail;
    }
    c->x509 = leaf;
    if (EVP_PKEY_up_ref(pkey) != 1) {
        bw_diag_add(diag, "%s: %s: cannot keep the loaded key", file, where);
        goto fail;
    }
    c->pkey = pkey;
    SSL_CTX_get0_chain_certs(tmp, &chain);
    c->chain = chain ? X509_chain_up_ref(chain) : sk_X509_new_null();
    if (c->chain == NULL || collect_names(c) < 0) {
        bw_diag_add(diag, "%s: %s: out of memory", file, where);
        goto fail;
    }
    c->kind = EVP_PKEY_get_base_id(c->pkey);
    SSL_CTX_free(tmp);
    tmp = NULL;

    if (X509_cmp_current_time(X509_get0_notAfter(c->x509)) < 0) {
        format_time(X509_get0_notAfter(c->x509), why, sizeof(why));
        if (warn)
            bw_diag_add(warn, "%s: %s.cert: %s expired on %s; serving it anyway", file, where,
                        cc->cert, why);
    }
    if (cc->ocsp != NULL) {
        unsigned char *der = NULL;
        size_t len = 0;
        bool revoked = false;
        const char *bad = NULL;
        if (read_small_file(cc->ocsp, &der, &len, why, sizeof(why)) < 0)
            bad = why;
        else
            bad = ocsp_check(c, der, len, why, sizeof(why), &revoked);
        if (bad != NULL) {
            free(der);
            if (warn)
                bw_diag_add(warn, "%s: %s.ocsp: not stapling %s: %s", file, where, cc->ocsp, bad);
        } else {
            c->ocsp = der;
            c->ocsp_len = len;
            if (revoked && warn)
                bw_diag_add(warn,
                            "%s: %s.ocsp: the OCSP response in %s says the certificate is "
                            "REVOKED; stapling it, replace the certificate",
                            file, where, cc->ocsp);
        }
    }
    ERR_clear_error();
    return 0;

fail:
    SSL_CTX_free(tmp);
    cert_clear(c);
    ERR_clear_error();
    return -1;
}

SSL_CTX *bw_tls_ctx_new(const bw_listener_conf *l, size_t index, const char *config_path,
                        bw_tls_keys *keys, bw_diag *diag, bw_diag *warn)
{
    const char *file = config_path ? config_path : "(config)";
    char why[512], where[96];
    SSL_CTX *ctx;
    tls_server *srv;
    bw_tls_cert_conf single;
    const bw_tls_cert_conf *certs;
    size_t n_certs;
    bool ok = true;

    /* Whatever an earlier caller left behind must not be blamed on this listener. */
    ERR_clear_error();

    if (l == NULL || !l->tls_enabled) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: not a TLS listener", file, index);
        return NULL;
    }
    if (l->tls.n_certs > 0) {
        certs = l->tls.certs;
        n_certs = l->tls.n_certs;
    } else {
        single = (bw_tls_cert_conf){.cert = l->tls.cert, .key = l->tls.key, .ocsp = NULL};
        certs = &single;
        n_certs = 1;
    }
    for (size_t i = 0; i < n_certs; i++) {
        if (certs[i].cert == NULL || certs[i].key == NULL) {
            bw_diag_add(diag, "%s: listeners[%zu].tls: both \"cert\" and \"key\" are required",
                        file, index);
            return NULL;
        }
    }

    srv = calloc(1, sizeof(*srv));
    if (srv != NULL)
        srv->certs = calloc(n_certs, sizeof(*srv->certs));
    if (srv == NULL || srv->certs == NULL) {
        free(srv);
        bw_diag_add(diag, "%s: listeners[%zu].tls: out of memory", file, index);
        return NULL;
    }
    srv->n_certs = n_certs;
    for (size_t i = 0; i < n_certs; i++) {
        if (l->tls.list)
            snprintf(where, sizeof(where), "listeners[%zu].tls.certificates[%zu]", index, i);
        else
            snprintf(where, sizeof(where), "listeners[%zu].tls", index);
        if (cert_load(&srv->certs[i], &certs[i], file, where, diag, warn) < 0)
            ok = false;
    }
    if (!ok) {
        server_free(srv);
        return NULL;
    }

    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot create a TLS context (OpenSSL: %s)", file,
                    index, drain_openssl_errors(why, sizeof(why)));
        server_free(srv);
        return NULL;
    }
    SSL_CTX_set_app_data(ctx, srv);

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

    /* The default certificate; the callback swaps in others per handshake. */
    if (SSL_CTX_use_cert_and_key(ctx, srv->certs[0].x509, srv->certs[0].pkey, srv->certs[0].chain,
                                 1) != 1) {
        bw_diag_add(diag, "%s: listeners[%zu].tls: cannot install the certificate (OpenSSL: %s)",
                    file, index, drain_openssl_errors(why, sizeof(why)));
        goto fail;
    }
    SSL_CTX_set_cert_cb(ctx, select_cert, srv);
    SSL_CTX_set_tlsext_status_cb(ctx, staple_ocsp);
    SSL_CTX_set_tlsext_status_arg(ctx, srv);

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
     * the worker generation that issued it. A session lives two rotation periods, which is
     * also how long its ticket's key stays available (BW_TLS_TICKET_KEYS). */
    if (keys != NULL) {
        uint32_t period = l->tls.ticket_rotate_ms ? l->tls.ticket_rotate_ms : 3600000u;
        srv->ring = ring_for(keys, period);
        if (srv->ring == NULL) {
            bw_diag_add(diag, "%s: listeners[%zu].tls: cannot create session ticket keys: %s", file,
                        index, strerror(errno ? errno : ENOMEM));
            goto fail;
        }
        bw_tls_ticket_advance(srv->ring, tls_mono_ms());
        SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_key_cb);
        long secs = (long)((2ull * period + 999) / 1000);
        SSL_CTX_set_timeout(ctx, secs);
    }

    ERR_clear_error();
    return ctx;

fail:
    bw_tls_ctx_free(ctx);
    ERR_clear_error();
    return NULL;
}

/* ---- files on disk ---- */

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t stamp_file(uint64_t h, const char *path)
{
    struct stat st;
    if (path == NULL)
        return fnv(h, "-", 1);
    h = fnv(h, path, strlen(path) + 1);
    if (stat(path, &st) < 0) {
        int e = errno;
        return fnv(h, &e, sizeof(e));
    }
    uint64_t v[7] = {(uint64_t)st.st_dev,          (uint64_t)st.st_ino,
                     (uint64_t)st.st_size,         (uint64_t)st.st_mtim.tv_sec,
                     (uint64_t)st.st_mtim.tv_nsec, (uint64_t)st.st_ctim.tv_sec,
                     (uint64_t)st.st_ctim.tv_nsec};
    return fnv(h, v, sizeof(v));
}

uint64_t bw_tls_files_stamp(const bw_config *cfg)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        const bw_tls_conf *t = &cfg->listeners[i].tls;
        if (!cfg->listeners[i].tls_enabled)
            continue;
        for (size_t k = 0; k < t->n_certs; k++) {
            h = stamp_file(h, t->certs[k].cert);
            h = stamp_file(h, t->certs[k].key);
            h = stamp_file(h, t->certs[k].ocsp);
        }
    }
    return h;
}

uint32_t bw_tls_reload_check_ms(const bw_config *cfg)
{
    uint32_t best = 0;
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        uint32_t v = cfg->listeners[i].tls.reload_check_ms;
        if (cfg->listeners[i].tls_enabled && v > 0 && (best == 0 || v < best))
            best = v;
    }
    return best;
}
