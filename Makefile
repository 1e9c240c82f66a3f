# The commands README.md names. `make serve` and `make test` work on a fresh Debian 12 machine
# (run as root, or with sudo for the apt step): they install what they need first.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
APT_PACKAGES = dcmtk dicom3tools pixelmed-apps default-jre-headless openssl util-linux \
               orthanc orthanc-python orthanc-dicomweb chromium postgresql
STAMP = .make

.PHONY: install system-deps serve test lint bench demo-models clean

$(STAMP)/install: pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/install

# Real DICOM peers and validators the tests talk to (DESIGN.md §7).
$(STAMP)/system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(STAMP) && touch $@

system-deps: $(STAMP)/system-deps

serve: install
	plugin serve --config config.yml

test: install system-deps
	$(PYTHON) -m pytest -q -ra

lint: install
	ruff check .
	ruff format --check .

bench: install
	$(PYTHON) -m bench.models
	$(PYTHON) -m bench.service
	$(PYTHON) -m bench.trainer

clean:
	rm -rf $(STAMP) var results .pytest_cache
