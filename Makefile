# The commands README.md names. `make serve` and `make test` work on a fresh Debian 12 machine
# (run as root, or with sudo for the apt step): they install what they need first.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
APT_PACKAGES = dcmtk dicom3tools pixelmed-apps default-jre-headless openssl util-linux \
               orthanc orthanc-python orthanc-dicomweb chromium postgresql npm
STAMP = .make

.PHONY: install system-deps ohif serve test test-fast lint bench demo-models clean

$(STAMP)/install: pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/install

# Real DICOM peers and validators the tests talk to (DESIGN.md §7).
$(STAMP)/system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(STAMP) && touch $@

system-deps: $(STAMP)/system-deps

# OHIF's prebuilt viewer (npm @ohif/app, no build) for serve_ohif.py and the real-OHIF browser
# test; fetched once per version into the git-ignored orthanc/ohif/dist.
OHIF_VERSION = 3.13.2
OHIF_DIST = orthanc/ohif/dist

$(OHIF_DIST)/.ohif-$(OHIF_VERSION): orthanc/ohif/fetch_ohif.sh | $(STAMP)/system-deps
	orthanc/ohif/fetch_ohif.sh $(OHIF_DIST) $(OHIF_VERSION)
	@touch $@

$(OHIF_DIST)/app-config.js: orthanc/ohif/app-config.js $(OHIF_DIST)/.ohif-$(OHIF_VERSION)
	cp $< $@

ohif: $(OHIF_DIST)/app-config.js

serve: install
	plugin serve --config config.yml

test: install system-deps ohif
	$(PYTHON) -m pytest -q -ra

# The suite without the tests marked slow (end-to-end services, training runs): for the edit loop.
test-fast: install system-deps ohif
	$(PYTHON) -m pytest -q -ra -m "not slow"

lint: install
	ruff check .
	ruff format --check .

bench: install
	$(PYTHON) -m bench.models
	$(PYTHON) -m bench.service
	$(PYTHON) -m bench.trainer

clean:
	rm -rf $(STAMP) var results .pytest_cache
