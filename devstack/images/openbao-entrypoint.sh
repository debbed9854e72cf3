#!/bin/sh
# As the upstream image's entrypoint, for what the compose file and the tests use of it:
# `server ...` runs `bao server` on /openbao/config (unless -dev is asked) as uid 100, owning its
# data folder; anything else runs as it is (as root: compose's openbao-init writes its volume).
set -e
if [ "${1:-}" = server ]; then
  shift
  set -- bao server "$@"
  case " $* " in
    *" -dev "* | *" -dev") ;;
    *) set -- "$@" -config=/openbao/config ;;
  esac
  if [ "$(id -u)" = 0 ]; then
    chown -R 100:1000 /openbao/file /openbao/logs 2>/dev/null || true
    exec setpriv --reuid=100 --regid=1000 --clear-groups "$@"
  fi
fi
exec "$@"
