//go:build tools

// Package tools records the Flightctl device-side commands that tests/env/flightctl/agent/build.sh
// builds (the real flightctl-agent and Flightctl's device simulator), so that `go mod tidy` keeps
// their dependencies in go.sum. A module of its own: the server's pins (../go.mod) and the cache
// key of its binaries stay as they are.
package tools

import (
	_ "github.com/flightctl/flightctl/cmd/devicesimulator"
	_ "github.com/flightctl/flightctl/cmd/flightctl-agent"
)
