# The front door. `make` builds, `make test` installs what is missing, builds with
# sanitizers and runs every test, `make serve` runs the main job on the shipped model,
# `make install [PREFIX=/usr/local] [DESTDIR=...]` installs zse, libzse, zse.h, zse.pc,
# zse(1), the bash completion and the systemd unit.
BUILD      ?= build
TEST_BUILD ?= build-test
JOBS       ?= $(shell nproc)
MODEL_DIR  ?= tests/fixtures/tiny-llama
MODEL      ?= $(BUILD)/tiny-llama.zse
CMAKE_FLAGS ?=
PREFIX     ?= /usr/local

.PHONY: all build test deps serve clean fuzz install

all: build

build:
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

deps:
	@tools/install-deps.sh

# The release flags (-O3) warn where the sanitizer build's do not (GCC's flow analysis runs
# with optimisation), and `make` is what users run: the C sources are compiled that way too.
test: deps
	cmake -S . -B $(TEST_BUILD)-release-c -DCMAKE_BUILD_TYPE=Release -DZSE_CUDA=OFF $(CMAKE_FLAGS) >/dev/null
	cmake --build $(TEST_BUILD)-release-c -j$(JOBS) -t zse
	cmake -S . -B $(TEST_BUILD) -DCMAKE_BUILD_TYPE=Debug -DZSE_SANITIZE=ON $(CMAKE_FLAGS)
	cmake --build $(TEST_BUILD) -j$(JOBS)
	cd $(TEST_BUILD) && ctest --output-on-failure -j$(JOBS)

$(MODEL): build
	@if [ ! -f $(MODEL) ]; then $(BUILD)/zse convert $(MODEL_DIR) -o $(MODEL) --quant int8; fi

serve: deps build $(MODEL)
	$(BUILD)/zse serve $(MODEL) --host 127.0.0.1 --port 8000

clean:
	rm -rf $(BUILD) $(TEST_BUILD) $(TEST_BUILD)-release-c
