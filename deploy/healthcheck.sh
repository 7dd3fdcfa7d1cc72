#!/bin/bash
# The image's HEALTHCHECK: GET /healthz from the daemon, on the address it
# was told to listen on. That is the --listen of the optd process (found in
# /proc, whatever its PID: `podman run --init` puts it under an init), else
# the OPTD_LISTEN of its environment, else this one's, else optd's default.
# 0.0.0.0 and :: are reached on loopback. bash's /dev/tcp is the client: no
# curl in the image. Exit 0 when the daemon answers 200. (OPTD_HEALTHCHECK_PROC
# names another /proc, for tests run outside a container.)
listen=""
for d in "${OPTD_HEALTHCHECK_PROC:-/proc}"/[0-9]*; do
    mapfile -d '' -t argv 2>/dev/null <"$d/cmdline" || continue
    [ "${#argv[@]}" -gt 0 ] && [ "${argv[0]##*/}" = optd ] || continue
    for ((i = 1; i < ${#argv[@]}; i++)); do
        case "${argv[i]}" in
        --listen=*) listen=${argv[i]#--listen=} ;;
        --listen) listen=${argv[i + 1]:-} ;;
        esac
    done
    if [ -z "$listen" ] && mapfile -d '' -t envv 2>/dev/null <"$d/environ"; then
        for e in "${envv[@]}"; do
            case "$e" in OPTD_LISTEN=*) listen=${e#OPTD_LISTEN=} ;; esac
        done
    fi
    break
done
listen=${listen:-${OPTD_LISTEN:-127.0.0.1:8080}}
port=${listen##*:}
host=${listen%:*}
host=${host#[}
host=${host%]}
case "$host" in
"" | 0.0.0.0) host=127.0.0.1 ;;
::) host=::1 ;;
esac
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 3 _ code _ <&3
[ "$code" = 200 ]
