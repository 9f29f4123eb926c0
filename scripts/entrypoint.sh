#!/bin/sh
# The image's entrypoint: `mailintegration ARGS...`, but before the daemon (`run`) starts,
# `mailintegration config validate` reports every mailbox file of its --config-dir in the log.
#
# A file that would not load does not stop the daemon by default: the daemon turns it into an
# outage event and reads the other mailboxes (one broken mailbox never stops the others).
# MAILINTEGRATION_VALIDATE says otherwise:
#   report (default)  validate, log the problems, start anyway
#   strict            do not start while any file has a problem (exit 1)
#   off               skip the validation
set -eu
bin="${MAILINTEGRATION_BIN:-mailintegration}"
mode="${MAILINTEGRATION_VALIDATE:-report}"
case "$mode" in
    report|strict|off) ;;
    *) echo "mailintegration-entrypoint: MAILINTEGRATION_VALIDATE must be report, strict or off, not '$mode'" >&2
       exit 2 ;;
esac
if [ "${1:-}" = "run" ] && [ "$mode" != "off" ]; then
    config_dir=mailboxes.d   # run's own default
    previous=""
    for arg in "$@"; do
        [ "$previous" = "--config-dir" ] && config_dir="$arg"
        case "$arg" in --config-dir=*) config_dir="${arg#--config-dir=}" ;; esac
        previous="$arg"
    done
    if ! "$bin" config validate --quiet --config-dir "$config_dir"; then
        if [ "$mode" = "strict" ]; then
            echo "mailintegration-entrypoint: the mailbox files above have problems; not starting (MAILINTEGRATION_VALIDATE=strict)" >&2
            exit 1
        fi
        echo "mailintegration-entrypoint: starting anyway; each broken file becomes an outage event" >&2
    fi
fi
exec "$bin" "$@"
