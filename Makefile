# llmlimit: build, run and test the nginx module against Debian's nginx.

SHELL      := /bin/bash
BUILD      ?= $(CURDIR)/build
NGX_SRC    ?= /usr/share/nginx/src
MODULE      = $(BUILD)/ngx_http_llmlimit_module.so
SOURCES     = config ngx_http_llmlimit_module.c $(wildcard src/*.c src/*.h)
NGX_CC_OPT  = -g -O2 -Wall -Wextra -Werror -fPIC $(CC_OPT)
NGX_LD_OPT  = -fPIC $(LD_OPT)
RELEASE     = $(BUILD)/release
DEB_PKGS    = nginx nginx-dev libhiredis-dev libjansson-dev libpcre2-dev \
              libssl-dev zlib1g-dev redis-server redis-sentinel wrk perl gcc \
              make curl

.PHONY: all build build-release build-src deps run test test-valgrind bench \
        clean nginx-source test-asan asan deb fuzz fuzz-build screenshot

all: build

build: $(MODULE)

# Installs what is missing from Debian's packages (idempotent).
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	        | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	        --no-install-recommends $$missing; \
	fi

$(BUILD)/nginx/objs/Makefile: $(NGX_SRC)/conf_flags config
	rm -rf $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -r $(NGX_SRC) $(BUILD)/nginx
	cd $(BUILD)/nginx && . ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(NGX_CC_OPT)" --with-ld-opt="$(NGX_LD_OPT)" \
	        --add-dynamic-module=$(CURDIR) > $(BUILD)/configure.log

$(MODULE): $(BUILD)/nginx/objs/Makefile $(SOURCES)
	$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules
	@# a new inode: a running nginx keeps the old file mapped
	cp $(BUILD)/nginx/objs/ngx_http_llmlimit_module.so $@.tmp
	mv -f $@.tmp $@

# make build-release: the same flags without --with-debug, so that code
# which only ngx_log_debug uses still builds warning-free; in $(RELEASE).
build-release: deps $(RELEASE)/ngx_http_llmlimit_module.so

$(RELEASE)/nginx/objs/Makefile: $(NGX_SRC)/conf_flags config
	rm -rf $(RELEASE)/nginx
	mkdir -p $(RELEASE)
	cp -r $(NGX_SRC) $(RELEASE)/nginx
	cd $(RELEASE)/nginx && . ./conf_flags && \
	    flags=(); for f in "$${NGX_CONF_FLAGS[@]}"; do \
	        [ "$$f" = --with-debug ] || flags+=("$$f"); \
	    done; \
	    ./configure "$${flags[@]}" \
	        --with-cc-opt="$(NGX_CC_OPT)" --with-ld-opt="$(NGX_LD_OPT)" \
	        --add-dynamic-module=$(CURDIR) > $(RELEASE)/configure.log

$(RELEASE)/ngx_http_llmlimit_module.so: $(RELEASE)/nginx/objs/Makefile \
                                        $(SOURCES)
	$(MAKE) -C $(RELEASE)/nginx -f objs/Makefile modules
	cp $(RELEASE)/nginx/objs/ngx_http_llmlimit_module.so $@.tmp
	mv -f $@.tmp $@

# make build-src NGINX_SRC=/path/to/nginx [NGINX_FLAGS=--with-debug]
# [STATIC=1]: the module against any nginx source tree (nginx.org's
# tarball, or a checkout, whose configure is auto/configure). A copy of the
# tree under $(SRC_BUILD) is configured afresh with --with-compat,
# NGINX_FLAGS and the cc-opt above, and the .so lands in $(SRC_BUILD).
# STATIC=1 builds nginx with the module in it (--add-module) instead:
# $(SRC_BUILD)/nginx/objs/nginx.
NGINX_SRC  ?=
NGINX_FLAGS ?=
STATIC     ?=
SRC_BUILD   = $(BUILD)/src

build-src:
	@[ -n "$(NGINX_SRC)" ] && [ -f "$(NGINX_SRC)/src/core/nginx.h" ] || { \
	    echo "usage: make build-src NGINX_SRC=/path/to/nginx" \
	         "[NGINX_FLAGS=...] [STATIC=1]" >&2; exit 2; }
	rm -rf $(SRC_BUILD)
	mkdir -p $(SRC_BUILD)
	cp -r $(NGINX_SRC) $(SRC_BUILD)/nginx
	cd $(SRC_BUILD)/nginx && \
	    if [ -x configure ]; then conf=./configure; \
	    else conf=auto/configure; fi; \
	    $$conf --with-compat $(NGINX_FLAGS) \
	        --with-cc-opt="$(NGX_CC_OPT)" --with-ld-opt="$(NGX_LD_OPT)" \
	        $(if $(STATIC),--add-module,--add-dynamic-module)=$(CURDIR) \
	        > $(SRC_BUILD)/configure.log
	@sed -n 's/^#define NGINX_VERSION *"\(.*\)"/nginx \1/p' \
	    $(SRC_BUILD)/nginx/src/core/nginx.h
	$(MAKE) -C $(SRC_BUILD)/nginx -f objs/Makefile \
	    $(if $(STATIC),,modules)
	$(if $(STATIC),,cp $(SRC_BUILD)/nginx/objs/ngx_http_llmlimit_module.so \
	    $(SRC_BUILD)/)

clean:
	rm -rf $(BUILD)

# --- run and test -----------------------------------------------------------

NGINX      ?= /usr/sbin/nginx
RUN_DIR     = $(BUILD)/run
PROVE      ?= prove
PROVE_OPTS ?=
TESTS      ?= t/

# the browser tests of the usage page (t/ui*.t): headless Chromium driven
# by Selenium, Debian's packages only
UI_PKGS     = chromium chromium-driver python3-selenium

# make run: conf.example in the foreground, prefix under $(BUILD)/run, with
# the module and the usage page (ui/) of this tree instead of the installed
# package's.
run: deps build
	mkdir -p $(RUN_DIR)/logs $(RUN_DIR)/temp
	sed -e 's|^\([[:space:]]*load_module[[:space:]]\{1,\}\).*ngx_http_llmlimit_module\.so;|\1$(MODULE);|' \
	    -e 's|^\([[:space:]]*alias[[:space:]]\{1,\}\)/usr/share/llmlimit/ui/;|\1$(CURDIR)/ui/;|' \
	    conf.example > $(RUN_DIR)/nginx.conf
	cp keys.example.json $(RUN_DIR)/keys.example.json
	$(NGINX) -q -t -p $(RUN_DIR)/ -c $(RUN_DIR)/nginx.conf
	@echo "llmlimit: http://127.0.0.1:8080 (LangSmith table)," \
	      "http://127.0.0.1:8082 (Langbase plans, keys.example.json)," \
	      "http://127.0.0.1:8083 (auth_request)," \
	      "backend http://127.0.0.1:8081; logs in $(RUN_DIR)/logs; Ctrl-C stops"
	exec $(NGINX) -p $(RUN_DIR)/ -c $(RUN_DIR)/nginx.conf -g 'daemon off;'

# make test: the whole suite against $(MODULE).  Debian's prometheus
# package (19 MB to download, 96 MB installed) brings promtool and the
# server that t/metrics*.t check the metrics endpoint with; UI_PKGS the
# headless Chromium of the usage page's tests.
TEST_PKGS   = prometheus $(UI_PKGS)

test: DEB_PKGS += $(TEST_PKGS)
test: deps build
	LLMLIMIT_MODULE=$(MODULE) $(PROVE) -r $(PROVE_OPTS) $(TESTS)

# make screenshot: docs/usage-page.png, the README's picture of the usage
# page, taken by t/ui.t in headless Chromium after its traffic.
screenshot: DEB_PKGS += $(UI_PKGS)
screenshot: deps build
	mkdir -p docs
	LLMLIMIT_MODULE=$(MODULE) \
	    LLMLIMIT_UI_SCREENSHOT=$(CURDIR)/docs/usage-page.png \
	    $(PROVE) t/ui.t

# make test-valgrind: the same with nginx under valgrind.
test-valgrind: DEB_PKGS += valgrind $(TEST_PKGS)
test-valgrind: deps build
	LLMLIMIT_MODULE=$(MODULE) LLMLIMIT_VALGRIND=1 \
	    $(PROVE) -r $(PROVE_OPTS) $(TESTS)

# make bench: throughput, latency, identities per MB and instructions per
# request against bare nginx and limit_req (bench/README.md).
bench: DEB_PKGS += valgrind gnuplot-nox curl
bench: deps build
	BENCH_MODULE=$(MODULE) bench/run.sh

# --- nginx under AddressSanitizer ------------------------------------------

# Debian's nginx sources, fetched with an apt configuration of build/'s own
# (a deb-src list, its own lists and cache; /etc/apt is never touched): the
# version of the installed nginx-dev if the archive still serves it, else
# the newest one it does.  Unpacked with Debian's patches in $(NGX_DEB_SRC).
APT_DIR     = $(BUILD)/apt
APT_OPTS    = -q -o Dir::Etc::sourcelist=$(APT_DIR)/sources.list \
              -o Dir::Etc::sourceparts=- -o Dir::State::Lists=$(APT_DIR)/lists \
              -o Dir::Cache=$(APT_DIR)/cache \
              -o APT::Sandbox::User=$$(id -un)
NGX_DEB_SRC = $(BUILD)/nginx-deb-src
DEB_MIRROR ?= http://deb.debian.org

nginx-source: $(NGX_DEB_SRC)/src/core/nginx.h

$(NGX_DEB_SRC)/src/core/nginx.h:
	rm -rf $(APT_DIR) $(NGX_DEB_SRC)
	mkdir -p $(APT_DIR)/lists/partial $(APT_DIR)/cache/archives/partial \
	    $(APT_DIR)/dl
	printf 'deb-src $(DEB_MIRROR)/debian %s main\n' \
	    bookworm bookworm-updates > $(APT_DIR)/sources.list
	printf 'deb-src $(DEB_MIRROR)/debian-security bookworm-security main\n' \
	    >> $(APT_DIR)/sources.list
	apt-get $(APT_OPTS) update
	cd $(APT_DIR)/dl && \
	    want=$$(dpkg-query -W -f='$${Version}' nginx-dev 2>/dev/null); \
	    for v in $$( { echo $$want; apt-cache $(APT_OPTS) showsrc nginx \
	                   | sed -n 's/^Version: //p' | sort -rV; } \
	                 | awk 'NF && !seen[$$0]++'); do \
	        rm -f ./*; \
	        apt-get $(APT_OPTS) source --download-only "nginx=$$v" \
	            && break; \
	    done; \
	    dpkg-source --no-check -x nginx_*.dsc $(NGX_DEB_SRC)
	test -f $@

# make test-asan: nginx itself and the module built from those sources with
# -fsanitize=address,undefined (pools allocating each block apart,
# NGX_DEBUG_PALLOC, so that ASan sees overruns inside a pool), then the
# whole suite against that nginx.  Every sanitizer report lands in
# $(ASAN_LOGS) and fails the run.
ASAN        = $(BUILD)/asan
ASAN_NGINX  = $(ASAN)/nginx/objs/nginx
ASAN_MODULE = $(ASAN)/nginx/objs/ngx_http_llmlimit_module.so
ASAN_LOGS   = $(ASAN)/reports
SAN_FLAGS   = -fsanitize=address,undefined -fno-omit-frame-pointer
ASAN_CC_OPT = -g -O1 $(SAN_FLAGS) -DNGX_DEBUG_PALLOC=1 -Wall -Wextra \
              -Werror -fPIC
ASAN_ENV    = ASAN_OPTIONS=log_path=$(ASAN_LOGS)/asan:detect_leaks=1:abort_on_error=0:detect_odr_violation=0 \
              UBSAN_OPTIONS=log_path=$(ASAN_LOGS)/ubsan:print_stacktrace=1 \
              LSAN_OPTIONS=suppressions=$(CURDIR)/t/asan.supp:print_suppressions=0
asan: DEB_PKGS += dpkg-dev
asan: deps $(ASAN_NGINX)

$(ASAN)/nginx/objs/Makefile: $(NGX_DEB_SRC)/src/core/nginx.h \
                             $(NGX_SRC)/conf_flags config
	rm -rf $(ASAN)/nginx
	mkdir -p $(ASAN)
	cp -r $(NGX_DEB_SRC) $(ASAN)/nginx
	cd $(ASAN)/nginx && . $(NGX_SRC)/conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --with-cc-opt="$(ASAN_CC_OPT)" --with-ld-opt="$(SAN_FLAGS)" \
	        --add-dynamic-module=$(CURDIR) > $(ASAN)/configure.log

$(ASAN_NGINX): $(ASAN)/nginx/objs/Makefile $(SOURCES)
	$(MAKE) -C $(ASAN)/nginx -f objs/Makefile -j$$(nproc)

# The whole suite but the accuracy files: they hold the module to exact
# bounds measured with client-side timestamps against a tight clock, which
# an instrumented nginx two to three times slower does not keep (they run in
# make test); everything they send is sent by other files too.
ASAN_TESTS ?= $(filter-out $(wildcard t/accuracy-*.t),$(wildcard t/*.t))

test-asan: DEB_PKGS += dpkg-dev $(TEST_PKGS)
test-asan: deps $(ASAN_NGINX)
	rm -rf $(ASAN_LOGS)
	mkdir -p $(ASAN_LOGS)
	chmod 0777 $(ASAN_LOGS)     # workers run as nobody
	$(ASAN_ENV) LLMLIMIT_NGINX=$(ASAN_NGINX) LLMLIMIT_MODULE=$(ASAN_MODULE) \
	    LLMLIMIT_NGX_TREE=$(ASAN)/nginx \
	    LLMLIMIT_SLOW=$${LLMLIMIT_SLOW:-3} \
	    $(PROVE) $(PROVE_OPTS) $(ASAN_TESTS); rc=$$?; \
	    reports=$$(ls $(ASAN_LOGS)); \
	    if [ -n "$$reports" ]; then \
	        for f in $(ASAN_LOGS)/*; do echo "== $$f"; head -60 "$$f"; done; \
	        echo "test-asan: sanitizer reports in $(ASAN_LOGS)" >&2; exit 1; \
	    fi; \
	    exit $$rc

# --- the Debian package -----------------------------------------------------

# make deb: libnginx-mod-http-llmlimit_VERSION_ARCH.deb in $(BUILD), built
# by dpkg-buildpackage from a copy of the tree under $(DEB_DIR) (its output
# goes to the parent directory of that copy), then checked by lintian
# (errors fail the target).  debhelper's nginx_mod build system configures
# against Debian's nginx-dev and dh_nginx adds the nginx-abi dependency.
DEB_DIR     = $(BUILD)/deb
DEB_NAME    = libnginx-mod-http-llmlimit
DEB_VERSION = $(shell dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null)
DEB_ARCH    = $(shell dpkg --print-architecture)
DEB_FILE    = $(BUILD)/$(DEB_NAME)_$(DEB_VERSION)_$(DEB_ARCH).deb

deb: DEB_PKGS += debhelper dpkg-dev fakeroot lintian
deb: deps
	rm -rf $(DEB_DIR)
	mkdir -p $(DEB_DIR)/$(DEB_NAME)
	tar -C $(CURDIR) --exclude=./build --exclude=./.git \
	    --exclude='*.o' --exclude='*.so' -cf - . \
	    | tar -C $(DEB_DIR)/$(DEB_NAME) -xf -
	cd $(DEB_DIR)/$(DEB_NAME) && \
	    dpkg-buildpackage -b -us -uc > $(DEB_DIR)/build.log 2>&1 \
	    || { tail -40 $(DEB_DIR)/build.log; exit 1; }
	cp $(DEB_DIR)/$(DEB_NAME)_$(DEB_VERSION)_$(DEB_ARCH).deb $(DEB_FILE)
	dpkg-deb -f $(DEB_FILE) Package Version Architecture Depends
	set -o pipefail; lintian --fail-on error --info $(DEB_DIR)/*.changes \
	    | tee $(DEB_DIR)/lintian.log
	@echo "$(DEB_FILE)"

# --- fuzzers ------------------------------------------------------------------

# make fuzz: clang's libFuzzer on the module's own code, linked with the
# objects of an nginx (Debian's sources, as for test-asan) built by clang
# with the module in it, under ASan and UBSan.  Each harness of t/fuzz/
# runs FUZZ_TIME seconds from its seed corpus t/fuzz/corpus/NAME (what it
# finds new goes to $(FUZZ)/corpus/NAME, crashes to $(FUZZ)/crashes/);
# a crash fails the target: add its input to the seed corpus once fixed.
# Not there yet (other issues): the key-directory loader and the usage
# API's parser; a harness for each goes in t/fuzz/ and its name in FUZZERS.
FUZZ        = $(BUILD)/fuzz
FUZZERS     = fuzz_rules fuzz_redis fuzz_algo fuzz_tokens
FUZZ_TIME  ?= 45
FUZZ_SAN    = -fsanitize=address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=undefined
FUZZ_NGX    = $(FUZZ)/nginx
FUZZ_PKGS   = clang libclang-rt-14-dev dpkg-dev

$(FUZZ_NGX)/objs/Makefile: $(NGX_DEB_SRC)/src/core/nginx.h config
	rm -rf $(FUZZ_NGX)
	mkdir -p $(FUZZ)
	cp -r $(NGX_DEB_SRC) $(FUZZ_NGX)
	@# configure's checks without the sanitizers (much faster), which
	@# are then added to the compiler's and the linker's flags
	cd $(FUZZ_NGX) && ./configure --with-cc=clang --with-cc-opt="-g -O1" \
	    --with-threads --with-http_auth_request_module \
	    --with-http_v2_module --add-module=$(CURDIR) \
	    > $(FUZZ)/configure.log
	sed -i -e 's|^CFLAGS =.*|& $(FUZZ_SAN) -fsanitize=fuzzer-no-link|' \
	    -e 's|^LINK =.*|& $(FUZZ_SAN)|' $(FUZZ_NGX)/objs/Makefile

$(FUZZ_NGX)/objs/nginx: $(FUZZ_NGX)/objs/Makefile $(SOURCES)
	$(MAKE) -C $(FUZZ_NGX) -f objs/Makefile -j$$(nproc) objs/nginx \
	    > $(FUZZ)/make.log 2>&1 || { tail -30 $(FUZZ)/make.log; exit 1; }

# nginx's objects but main() (libFuzzer's) and the module file that a
# harness includes itself to reach its static functions
$(FUZZ)/%: t/fuzz/%.c t/fuzz/fuzz.h $(FUZZ_NGX)/objs/nginx
	cd $(FUZZ_NGX) && \
	    objcopy --redefine-sym main=ngx_main_unused \
	        objs/src/core/nginx.o $(FUZZ)/nginx_nomain.o && \
	    own=$$(sed -n 's|^#include "../../src/\(.*\)\.c"|\1.o|p' \
	           $(CURDIR)/$<); \
	    objs=$$(find objs -name '*.o' ! -path objs/src/core/nginx.o \
	            $${own:+! -name $$own}); \
	    libs=$$(sed -n '/-o objs\/nginx /,/^$$/p' objs/Makefile \
	            | grep -o -- ' -l[^ ]*\| -Wl,[^ ]*' | tr '\n' ' '); \
	    clang -g -O1 $(FUZZ_SAN) -fsanitize=fuzzer \
	        -I src/core -I src/event -I src/event/modules -I src/os/unix \
	        -I src/http -I src/http/modules -I src/http/v2 -I objs \
	        -I $(CURDIR)/src -o $@ $(CURDIR)/$< $(FUZZ)/nginx_nomain.o \
	        $$objs $$libs

fuzz-build: DEB_PKGS += $(FUZZ_PKGS)
fuzz-build: deps $(addprefix $(FUZZ)/,$(FUZZERS))

fuzz: DEB_PKGS += $(FUZZ_PKGS)
fuzz: deps $(addprefix $(FUZZ)/,$(FUZZERS))
	mkdir -p $(FUZZ)/crashes
	@for f in $(FUZZERS); do \
	    mkdir -p $(FUZZ)/corpus/$$f; \
	    echo "== $$f, $(FUZZ_TIME) s"; \
	    $(FUZZ)/$$f -max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
	        -artifact_prefix=$(FUZZ)/crashes/$$f- -max_len=4096 \
	        $(FUZZ)/corpus/$$f t/fuzz/corpus/$$f \
	        > $(FUZZ)/$$f.log 2>&1; rc=$$?; \
	    grep -E '^#[0-9]+[[:space:]]+(DONE|INITED)|stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' \
	        $(FUZZ)/$$f.log; \
	    if [ $$rc != 0 ]; then \
	        tail -60 $(FUZZ)/$$f.log; \
	        echo "fuzz: $$f failed, input in $(FUZZ)/crashes/" >&2; \
	        exit 1; \
	    fi; \
	done
