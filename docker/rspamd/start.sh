#!/bin/sh
# Redis (Bayes, saved in the volume), the controller's password, then rspamd.
set -eu
mkdir -p /var/lib/rspamd/redis /run/rspamd
chown -R _rspamd:_rspamd /var/lib/rspamd /run/rspamd
chmod 0751 /var/lib/rspamd  # Redis goes through to its folder
chown -R redis:redis /var/lib/rspamd/redis
chmod 0700 /var/lib/rspamd/redis
setpriv --reuid=redis --regid=redis --init-groups \
  redis-server --bind 127.0.0.1 --port 6379 --dir /var/lib/rspamd/redis --save "900 1" \
  --appendonly no --daemonize no &

secret=/run/gateway-rspamd/password
if [ ! -s "$secret" ]; then
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$secret")
fi
chown 10025:10025 "$secret"
chmod 0600 "$secret"
hash=$(rspamadm pw -p "$(cat "$secret")")
cat > /etc/rspamd/override.d/worker-controller.inc <<CONF
bind_socket = "*:11334";
password = "$hash";
enable_password = "$hash";
secure_ip = "127.0.0.1";
static_dir = "\${WWWDIR}";
CONF
cat > /etc/rspamd/override.d/worker-normal.inc <<CONF
bind_socket = "*:11333";
CONF
exec rspamd -f -u _rspamd -g _rspamd -c /etc/rspamd/rspamd.conf
