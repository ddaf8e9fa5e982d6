#!/bin/sh
# clamd with freshclam beside it: signatures refreshed twice a day into the volume. At the
# first start, clamd waits for a database (the gateway answers 451 meanwhile: nothing is
# let through unscanned).
set -eu
chown -R clamav:clamav /var/lib/clamav
freshclam --daemon --checks=2 || echo "clamav: freshclam could not start; signatures are not refreshed" >&2
has_database() {
  for f in /var/lib/clamav/*.cvd /var/lib/clamav/*.cld /var/lib/clamav/*.[hn]db; do
    [ -e "$f" ] && return 0
  done
  return 1
}
until has_database; do
  echo "clamav: waiting for a signature database in /var/lib/clamav (freshclam)" >&2
  sleep 10
done
exec clamd --config-file=/etc/clamav/clamd.conf
