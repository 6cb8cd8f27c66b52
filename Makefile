# kiln: two commands. `make demo` and `make test` install what is missing, build, and run.
BUILD ?= build
BUILD_TYPE ?= RelWithDebInfo
SANITIZE ?= OFF
JOBS ?= $(shell nproc)
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
# ccache (set up by scripts/setup.sh) shares compiles between clones of the repository.
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1

.PHONY: all setup configure build package test demo bench sanitize format clean

all: build

setup:
	@scripts/setup.sh

$(BUILD)/build.ninja: CMakeLists.txt | setup
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DKILN_SANITIZE=$(SANITIZE) \
	  -DPython3_EXECUTABLE=$(CURDIR)/.venv/bin/python

configure: setup $(BUILD)/build.ninja

build: configure
	cmake --build $(BUILD) -j $(JOBS)
	@$(MAKE) --no-print-directory package

# The Python package `kiln` into .venv, with the libkiln.so just built (pyproject.toml); again only
# when the library or the package changed. Not for sanitizer builds.
package:
ifeq ($(SANITIZE),OFF)
	@stamp=.venv/.kiln-package-$(notdir $(BUILD)); \
	if [ ! -f $$stamp ] || [ -n "$$(find -L $(BUILD)/lib/libkiln.so python/kiln pyproject.toml -newer $$stamp -print -quit)" ]; then \
	  echo "kiln: installing the Python package into .venv"; \
	  .venv/bin/pip install --no-build-isolation --no-deps -q . \
	    -Ccmake.define.KILN_PREBUILT_LIBRARY=$(CURDIR)/$(BUILD)/lib/libkiln.so && touch $$stamp; \
	fi
endif

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	$(BUILD)/bin/kiln demo

bench: build
	$(BUILD)/bin/kiln_bench

# ASan/UBSan build of the CPU tests (CI runs it after `make test`).
sanitize:
	$(MAKE) test BUILD=build-asan BUILD_TYPE=Debug SANITIZE=ON

format:
	git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD) build-asan
