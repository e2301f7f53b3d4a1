# Two commands (README): `make test` and `make demo`. Everything else is a step of those two,
# plus `make check`, the edit-test loop (README "Tests").
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build

# Nothing of ours may leave this machine: DDS discovery stays on localhost, and each run uses a
# domain of its own (tests give every test that starts processes a domain id of its own).
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42
export TF_CPP_MIN_LOG_LEVEL := 3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test check demo compare dagger install build lint format bench constraints clean

# The venv, with every version pinned by constraints.txt (ros-* wheels included).
$(VENV)/.installed: requirements.txt requirements-build.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt \
	  -r requirements.txt -r requirements-build.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# CMake + rosidl into the venv, as colcon would lay it out (tools/build.sh says why not colcon).
# flock: several shells (or sessions) may build at once; one cmake at a time per tree.
build: install
	flock $(BUILD).lock tools/build.sh $(VENV) $(BUILD)

# Lint, then every test against the installed package (run from test/ so the source tree cannot
# shadow it).
test: build lint
	cd test && ../$(VENV)/bin/pytest -p no:cacheprovider --durations=20

# The edit-test loop: an incremental build, then every test not marked slow (under 2 min on
# 2 cores). One file: `make build && cd test && ../.venv/bin/pytest -p no:cacheprovider FILE`.
check: build
	cd test && ../$(VENV)/bin/pytest -p no:cacheprovider -m 'not slow' -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Each benchmark prints its own table of ratios against the reference route, measured in one run.
bench: build
	set -e; for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# Record the simulator's expert, train on it, drive the simulated MaLPi through the ROS graph
# with the LSTM state carried and then reset every frame; the table, PNG and everything else go
# to demo_runs/<timestamp>/. -P: the installed package, not this source tree (no messages here).
# DEMO_ARGS: e.g. DEMO_ARGS='--laps 5' or DEMO_ARGS='--bundle demo_runs/<run>/bundle'.
demo: build
	$(PY) -P -m malpi_ros.sim.demo --out demo_runs $(DEMO_ARGS)

# The LSTM with its state carried against window policies (the peers' way: the last K frames
# re-run every step) at the short and the long memory horizon, in-process (no ROS).
# COMPARE_ARGS: e.g. COMPARE_ARGS='--horizons long --windows 3 --laps 10'.
compare: build
	$(PY) -P -m malpi_ros.sim.compare --out compare_runs $(COMPARE_ARGS)

# HG-DAgger rounds in the simulator against behaviour cloning on as many expert frames, in-process
# (no ROS; README "DAgger rounds in the simulator"). DAGGER_ARGS: e.g. DAGGER_ARGS='--rounds 2'.
dagger: build
	$(PY) -P -m malpi_ros.sim.dagger --out dagger_runs $(DAGGER_ARGS)

constraints: install
	{ echo "# Every version make test installs, the ros-* wheels included. Regenerate with"; \
	  echo "# 'make constraints' after changing a requirements file (then review the diff)."; \
	  $(PY) -m pip freeze | grep -v -E '^(malpi|-e )'; } > constraints.txt

clean:
	rm -rf $(BUILD) $(BUILD).*.log $(BUILD).lock
