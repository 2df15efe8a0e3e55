/*
 * Command line: -c FILE runs the proxy, -t checks a configuration, -V prints versions, -h usage.
 *
 * A configuration check goes as far as a start would without binding sockets: the JSON is
 * parsed and validated, and every TLS context is built, so a certificate that does not match its
 * key is caught by -t and not at 3 a.m. by a reload.
 */
#include <cjson/cJSON.h>
#include <event2/event.h>
/* evhtp.h declares a hook type with an empty parameter list. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <evhtp.h>
#pragma GCC diagnostic pop
#include <hiredis/hiredis.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "breakwater/config.h"
#include "breakwater/master.h"
#include "breakwater/tls.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: breakwater -c FILE        run with this configuration (JSON)\n"
               "       breakwater -t -c FILE     check the configuration and exit\n"
               "       breakwater -V             print version and library versions\n"
               "       breakwater -h             this help\n"
               "signals: HUP reload, TERM/INT drain and exit, USR1 reopen log files\n");
}

static void print_versions(void)
{
    printf("breakwater %s\n", BW_VERSION);
    printf("libevent %s\n", event_get_version());
    printf("OpenSSL %s\n", bw_tls_library_version());
    printf("cJSON %s\n", cJSON_Version());
    printf("hiredis %d.%d.%d\n", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
    printf("libevhtp %s\n", EVHTP_VERSION);
}

/* Builds (and drops) every TLS context, so key/certificate mismatches are reported. */
static void check_tls(const bw_config *cfg, bw_diag *diag)
{
    bw_tls_keys keys;
    bw_diag warn;
    memset(&keys, 0, sizeof(keys));
    bw_diag_init(&warn);
    for (size_t i = 0; i < cfg->n_listeners; i++) {
        if (!cfg->listeners[i].tls_enabled)
            continue;
        bw_tls_ctx_free(bw_tls_ctx_new(&cfg->listeners[i], i, cfg->path, &keys, diag, &warn));
    }
    for (size_t i = 0; i < warn.count; i++)
        fprintf(stderr, "warning: %s\n", warn.lines[i]);
    bw_diag_free(&warn);
    bw_tls_keys_free(&keys);
}

/* -t: a server name that does not resolve now is a warning, not an error: DNS may well have it
 * by the time the proxy runs (a Service created later, a pod not scheduled yet). With top-level
 * "resolvers" the system resolver says nothing useful, so the check is left to run time. */
static void warn_unresolved(const bw_config *cfg)
{
    if (cfg->n_resolvers > 0)
        return;
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const bw_upstream_conf *u = &cfg->upstreams[i];
        for (size_t k = 0; k < u->n_servers; k++) {
            const bw_server_conf *sc = &u->servers[k];
            if (sc->host == NULL)
                continue;
            struct addrinfo hints, *res = NULL;
            memset(&hints, 0, sizeof(hints));
            hints.ai_socktype = SOCK_STREAM;
            int rc = getaddrinfo(sc->host, NULL, &hints, &res);
            if (rc == 0) {
                freeaddrinfo(res);
                continue;
            }
            fprintf(stderr,
                    "%s: upstreams.%s.servers[%zu]: warning: \"%s\" does not resolve now (%s); it "
                    "is resolved again at run time\n",
                    cfg->path, u->name, k, sc->host, gai_strerror(rc));
        }
    }
}

int main(int argc, char **argv)
{
    const char *config = NULL;
    bool test_only = false;
    int opt;
    opterr = 0;
    while ((opt = getopt(argc, argv, "c:tVh")) != -1) {
        switch (opt) {
        case 'c':
            config = optarg;
            break;
        case 't':
            test_only = true;
            break;
        case 'V':
            print_versions();
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            if (optopt == 'c')
                fprintf(stderr, "breakwater: -c needs a file name\n");
            else
                fprintf(stderr, "breakwater: unknown option -%c\n", optopt ? optopt : '?');
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "breakwater: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!config) {
        usage(stderr);
        return 2;
    }

    bw_diag diag;
    bw_diag_init(&diag);
    bw_config *cfg = bw_config_load(config, NULL, &diag);
    if (cfg && test_only)
        check_tls(cfg, &diag);
    if (!cfg || diag.count > 0) {
        for (size_t i = 0; i < diag.count; i++)
            fprintf(stderr, "%s\n", diag.lines[i]);
        if (diag.count == 0)
            fprintf(stderr, "%s: cannot load configuration\n", config);
        bw_diag_free(&diag);
        bw_config_free(cfg);
        return 1;
    }
    bw_diag_free(&diag);
    if (test_only) {
        for (size_t i = 0; i < cfg->n_notes; i++)
            printf("%s\n", cfg->notes[i]);
        warn_unresolved(cfg);
        printf("configuration ok\n");
        bw_config_free(cfg);
        return 0;
    }
    return bw_master_run(config, cfg);
}
