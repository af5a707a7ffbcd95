# fleetlet developer entry points. `make demo` runs fleetlet end to end; `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all demo demo-down demo-device-stop demo-device-start demo-device-fleet build release test faults-summary unit-test lint fmt env-up env-down env-reset clean agent-bench hub-bench link-bench flightctl-bench pod-start-bench hub-scale-bench bench faults package package-check conformance

all: build

## demo: fleetlet end to end: the local stack, three devices enrolled in its Flightctl (fleets a and b),
## a hub on the Flightctl inventory and three agents, a Deployment on fleet a
demo: env-up
	tests/demo/demo.sh

## demo-down: stop what `make demo` started (the local stack keeps running: make env-down)
demo-down:
	tests/demo/demo-down.sh

## demo-device-stop: stop one demo device's agent, e.g. make demo-device-stop DEVICE=demo.edge.device.a1
demo-device-stop:
	@tests/demo/device.sh stop "$(DEVICE)"

## demo-device-start: start one demo device's agent again, e.g. make demo-device-start DEVICE=demo.edge.device.a1
demo-device-start:
	@tests/demo/device.sh start "$(DEVICE)"

## demo-device-fleet: relabel a demo device in Flightctl, its Node follows, e.g.
## make demo-device-fleet DEVICE=demo.edge.device.b1 FLEET=a
demo-device-fleet:
	@tests/demo/device.sh fleet "$(DEVICE)" "$(FLEET)"

## build: debug build of every crate
build:
	$(CARGO) build --workspace --all-targets

## release: optimized, stripped binaries
release:
	$(CARGO) build --workspace --release

## test: unit and integration tests (integration tests run against the local stack; the short fault
## subset included), the fault table, then the packages
test: build env-up
	rm -f target/faults/report.jsonl
	$(CARGO) test --workspace --no-fail-fast; \
	  status=$$?; $(FAULTS_SUMMARY); exit $$status
	$(MAKE) package-check

# Prints the fault table; exit 2 (no outcomes recorded) is not a failure of its own. Not a
# `$(MAKE) faults-summary` call: make runs lines holding $(MAKE) even under `make -n`.
FAULTS_SUMMARY = $(CARGO) run -q -p fleetlet-faults --bin faults-summary; \
	  case $$? in 0) ;; 2) echo "faults-summary: no fault outcomes recorded";; *) false;; esac

## faults-summary: print the table of the faults recorded by the last test run (target/faults/report.jsonl)
faults-summary:
	@$(FAULTS_SUMMARY)

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## faults: the full fault and abuse suite (long partitions, crashes, disk, bad input, security), then its table
faults: build env-up
	rm -f target/faults/report.jsonl
	FLEETLET_FAULTS_FULL=1 $(CARGO) test -p fleetlet-faults --no-fail-fast -- --test-threads=1; \
	  status=$$?; $(CARGO) test -p fleetlet-hub --test link removal_from_inventory || status=1; $(CARGO) run -q -p fleetlet-faults --bin faults-summary && exit $$status

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## env-up: start (or reuse) the local stack; writes target/dev/env and target/dev/kubeconfig
env-up:
	tests/env/up.sh --out $(CURDIR)/target/dev

## env-down: stop every process of the local stack
env-down:
	tests/env/down.sh

## env-reset: stop the local stack and delete its state (PKI, etcd data, logs)
env-reset:
	tests/env/reset.sh

## agent-bench: agent RSS/CPU idle and with 10 pods, and its stripped binary size (real Podman)
agent-bench: env-up
	source target/dev/env && agent/bench/footprint.sh

## package: the agent's .deb and .rpm in target/package (stripped release build)
package:
	packaging/install-tools.sh
	packaging/build.sh

## package-check: build the packages, lint them, install and remove the .deb on this machine
package-check: package
	packaging/check.sh

## hub-bench: hub node keeping with 500 simulated devices against the real API server
hub-bench: env-up
	source target/dev/env && $(CARGO) bench -p fleetlet-hub --bench nodes_scale

## link-bench: link connect time, RSS and idle bytes per device, reconnect storm (real TLS, 2000 devices)
link-bench:
	$(CARGO) bench -p fleetlet-hub --bench link -- --devices 2000 --runs 3 --idle-secs 60

## flightctl-bench: Flightctl inventory sync against the stack's Flightctl (500 devices, 10 fleets), then agentless pods placed through its API
flightctl-bench: env-up
	source target/dev/env && $(CARGO) bench --profile dev -p fleetlet-hub --bench flightctl_inventory

## pod-start-bench: 100 pods over 10 real agents (real hub, mTLS link, Podman): binding -> Running latency
pod-start-bench: env-up
	$(CARGO) build --release -p fleetlet-agent
	source target/dev/env && $(CARGO) bench -p fleetlet-hub --bench pod_start

## hub-scale-bench: real hub process, 500 simulated devices in 10 fleets over real gRPC/mTLS, real API server
hub-scale-bench: env-up
	source target/dev/env && $(CARGO) bench -p fleetlet-hub --bench hub_scale

## conformance: the upstream e2e suite's node tests (sig-node Conformance/NodeConformance, node-local
## storage) against two fleetlet Nodes; builds e2e.test, ginkgo and agnhost once per machine
conformance: env-up
	tests/conformance/run.sh

## bench: every benchmark, one after the other
bench: env-up
	$(MAKE) agent-bench
	$(MAKE) hub-bench
	$(MAKE) link-bench
	$(MAKE) flightctl-bench
	$(MAKE) pod-start-bench
	$(MAKE) hub-scale-bench

clean:
	$(CARGO) clean
