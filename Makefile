# hdrlog — `make demo` and `make test` each install everything they need first.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# Debian's python3 so that the virtualenv sees the OS's BCC (python3-bpfcc).
SYSPY := /usr/bin/python3

.PHONY: install os venv demo test e2e corpus bench proto check-clean help

help:
	@echo "make demo   install everything, run server + collector on a namespace lab, print SQL answers"
	@echo "make test   install everything and run the whole test suite"
	@echo "make e2e    boot a 4-machine nspawn fleet and prove site/upgrade/uninstall.yml on it"
	@echo "make corpus replay all 401 corpus captures and compare every field with tshark"
	@echo "make bench  run the benchmarks, print the table, write BENCHMARKS.md"
	@echo "make proto  regenerate proto/ingest_pb2*.py from proto/ingest.proto"

install: os venv

os:
	@bash scripts/install-os.sh

# Reinstall the project only when its declaration changed.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@# `hdrlog` on PATH for the README's commands (root only: /usr/local/bin is root's).
	@if [ "$$(id -u)" -eq 0 ] && [ ! -e /usr/local/bin/hdrlog -o -L /usr/local/bin/hdrlog ]; then \
	  ln -sfn $(CURDIR)/$(VENV)/bin/hdrlog /usr/local/bin/hdrlog; fi
	@touch $@

demo: install
	$(PY) -m hdrlog.dev.demo

test: install
	@bash scripts/check-clean.sh --before $(VENV)/.clean-before
	$(VENV)/bin/pytest -q
	@bash scripts/check-clean.sh --since $(VENV)/.clean-before

e2e: install
	@bash scripts/check-clean.sh --before $(VENV)/.clean-before
	$(VENV)/bin/pytest -q tests/e2e
	@bash scripts/check-clean.sh --since $(VENV)/.clean-before

corpus: install
	@bash scripts/check-clean.sh --before $(VENV)/.clean-before
	HDRLOG_CORPUS=full $(VENV)/bin/pytest -q -s tests/corpus/test_corpus.py
	@bash scripts/check-clean.sh --since $(VENV)/.clean-before

bench: install
	$(PY) -m bench.run BENCHMARKS.md

check-clean:
	@bash scripts/check-clean.sh

proto: venv
	@d=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc --proto_path=hdrlog/proto=proto --python_out=$$d --pyi_out=$$d \
	  --grpc_python_out=$$d hdrlog/proto/ingest.proto && cp $$d/hdrlog/proto/* proto/ && rm -rf $$d
