# Every target installs what it needs itself, idempotently (run as root on Debian 12).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-st test-long bench lint clean

MANPAGE := $(VENV)/share/man/man1/imager.1

setup: system-deps $(STAMP) $(MANPAGE)

system-deps:
	@./scripts/install-system-deps

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The man page is generated from the parser: made again whenever the command line changes.
$(MANPAGE): $(STAMP) $(wildcard imager/cli/*.py)
	mkdir -p $(dir $@)
	$(VENV)/bin/imager manpage > $@.tmp && mv $@.tmp $@

demo: setup
	$(VENV)/bin/imager demo

# The suite on loop devices and, at the same time (where ../shared/vm-tape is, beside the
# checkout), the tests that need the real st driver in one VM; either failing fails the target.
test: setup lint
	PY=$(PY) scripts/test-all

# The st driver, a SCSI medium changer and mt/dd/zstd on what imager wrote, in one VM of the
# vm-tape rig (scripts/test-st); fails when the rig is not there.
test-st: setup
	PY=$(PY) scripts/test-st

# The fault sweeps at full size (hundreds of kills, thousands of damaged images): hours, not minutes.
test-long: setup
	IMAGER_TEST_LONG=1 $(PY) -m pytest -q -p no:cacheprovider --benchmark-disable tests

# The side-by-side tables of the README, then the micro benchmarks (builds the volumes once).
bench: setup
	$(PY) bench/compare.py --peers dd,tape --rounds 2 --imager-args=--all-blocks
	$(PY) bench/compare.py --aged --level 1 --peers dd,partclone,qemu --rounds 2
	$(PY) bench/compare.py --fs xfs --aged --level 1 --peers dd,partclone --rounds 2 --no-restore
	$(PY) bench/front.py
	$(PY) bench/mount.py
	$(PY) bench/tape_streaming.py --buffer-mib 64
	$(PY) -m pytest -q -p no:cacheprovider -o python_files="bench_*.py" bench

# pyflakes everywhere, the layering of the data flow, mypy on the seams (strict on format, ends and plan).
lint: setup
	$(PY) -m compileall -q imager devices tests bench
	$(PY) -m pyflakes imager devices tests bench scripts
	$(PY) scripts/check-layering.py
	$(PY) -m mypy imager/format imager/ends imager/plan imager/pipeline.py imager/api.py imager/jobs/backup.py \
		imager/jobs/restore.py imager/jobs/verify.py imager/jobs/info.py imager/snapshot/provider.py \
		imager/mount imager/jobs/mount.py imager/spawn.py

clean:
	rm -rf $(VENV) bench/work
