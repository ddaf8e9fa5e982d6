# One command to run the gateway, one to run the tests; each does its own set-up.
#   make run    the gateway on the embedded default (SMTP on 127.0.0.1:2525, Maildir delivery)
#   make test   lint, type checks and the whole test suite (installs Postfix for its tests)
#   make bench  the benchmark against the bare pass-through proxy (bench/RESULTS.md)
#   make soak   the whole suite N times in a row (N=20), stopping at the first failure: flakes
#   make mutation  mutation testing (mutmut) of the modules that hold the promises: hours;
#               MUTANTS="quarantine.files.*" for some of them (mutmut's mutant names)
#   make mutation-sample  the functions that carry the promises, against the promise tests:
#               every mutant must be killed (CI runs it after the tests; minutes)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench soak mutation mutation-sample system-deps lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The embedded default (GATEWAY_CONFIG empty), even where /etc/gateway/gateway.toml exists;
# ARGS="--config FILE" for a file.
run: $(STAMP)
	GATEWAY_CONFIG= $(BIN)/gateway serve $(ARGS)

# Debian packages the tests and the benchmark drive: Postfix (a real next hop, and smtp-sink),
# HAProxy (a real front proxy speaking the PROXY protocol), ClamAV's clamd and rspamd with Redis
# (the optional engines, each test runs its own), systemd (systemd-analyze checks the unit),
# Chromium (the banner as a mail reader renders it, the web page driven by Playwright), a font
# for it, libmagic (true file types) and libatomic (Playwright's node driver needs it). Only
# these and what they depend on (no recommended packages: no avahi), and no service left
# running or enabled at boot: the daemons are installed unconfigured, kept from starting
# during the install (policy-rc.d), then disabled; the tests run their own instances. A Postfix installed before is left as it was. Only what is
# missing is installed (dpkg's own record, whatever the PATH).
SYSTEM_PACKAGES := postfix chromium fonts-dejavu-core libmagic1 libatomic1 haproxy systemd \
  clamav-daemon rspamd redis-server
# Daemons these packages bring, never left enabled when this target installed them.
SYSTEM_SERVICES := postfix haproxy clamav-daemon clamav-freshclam rspamd redis-server
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  fresh=""; for s in $(SYSTEM_SERVICES); do \
	    dpkg-query -W -f='$${Status}' $$s 2>/dev/null | grep -q "ok installed" || fresh="$$fresh $$s"; \
	  done; \
	  case "$$missing" in *postfix*) \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections;; \
	  esac; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; \
	    trap 'rm -f /usr/sbin/policy-rc.d' EXIT; trap 'exit 130' INT TERM HUP; \
	  fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing || exit 1; \
	  for svc in $$fresh; do \
	    systemctl disable $$svc >/dev/null 2>&1 || true; \
	    update-rc.d $$svc disable >/dev/null 2>&1 || true; \
	  done; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check gateway quarantine tests bench
	$(BIN)/mypy

test: $(STAMP) system-deps lint
	$(BIN)/pytest

bench: $(STAMP) system-deps
	$(BIN)/python bench/run.py $(ARGS)

N ?= 20
soak: $(STAMP) system-deps
	@for i in $$(seq 1 $(N)); do \
	  echo "== run $$i of $(N)"; \
	  $(BIN)/pytest -q -p no:cacheprovider || { echo "== failed on run $$i of $(N)"; exit 1; }; \
	done; echo "== $(N) runs in a row passed"

# The shared corpus is found from the test folder's place, which mutmut's copy (mutants/)
# moves: its path is given.
CORPUS ?= $(abspath ../shared/corpus)
mutation: $(STAMP) system-deps
	GATEWAY_CORPUS=$(CORPUS) $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

mutation-sample: $(STAMP) system-deps
	GATEWAY_CORPUS=$(CORPUS) $(BIN)/python tests/mutation_sample.py
