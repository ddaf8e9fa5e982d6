#!/bin/sh
# The trial mailbox server's start: its configuration from the environment, then Dovecot in
# the background and Postfix in the foreground (its log on stdout).
#   GATEWAY_DOMAINS      the practice's domains (comma-separated), as for the gateway
#   ESSAI_MOT_DE_PASSE   the IMAP password of every mailbox (required)
set -eu
: "${GATEWAY_DOMAINS:?GATEWAY_DOMAINS is required}"
: "${ESSAI_MOT_DE_PASSE:?ESSAI_MOT_DE_PASSE is required}"
domains=$(echo "$GATEWAY_DOMAINS" | tr ',' ' ' | xargs)
first=$(echo "$domains" | cut -d' ' -f1)

postconf -e \
  "myhostname=boite.$first" "mydestination=" "mynetworks=127.0.0.0/8" \
  "virtual_mailbox_domains=$domains" \
  "virtual_transport=lmtp:unix:private/dovecot-lmtp" \
  "smtpd_reject_unlisted_recipient=no" \
  "smtpd_relay_restrictions=reject_unauth_destination" \
  "maillog_file=/dev/stdout" "compatibility_level=3.6"
postconf -F '*/*/chroot = n'
printf '%s\n' "$first" > /etc/mailname

cat > /etc/dovecot/local.conf <<CONF
protocols = imap lmtp
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:/var/mail/%d/%n/Maildir
first_valid_uid = 10026
passdb {
  driver = static
  args = password=$ESSAI_MOT_DE_PASSE
}
userdb {
  driver = static
  args = uid=vmail gid=vmail home=/var/mail/%d/%n
}
service lmtp {
  unix_listener /var/spool/postfix/private/dovecot-lmtp {
    mode = 0600
    user = postfix
    group = postfix
  }
}
log_path = /dev/stderr
CONF
chgrp dovecot /etc/dovecot/local.conf
chmod 0640 /etc/dovecot/local.conf
chown vmail:vmail /var/mail
chmod 0700 /var/mail
dovecot
exec postfix start-fg
