//go:build tools

// Package tools records the Flightctl commands that `make env-up` builds, so that `go mod tidy`
// keeps their dependencies in go.sum.
package tools

import (
	_ "github.com/flightctl/flightctl/cmd/flightctl"
	_ "github.com/flightctl/flightctl/cmd/flightctl-api"
	_ "github.com/flightctl/flightctl/cmd/flightctl-db-migrate"
	_ "github.com/flightctl/flightctl/cmd/flightctl-periodic"
	_ "github.com/flightctl/flightctl/cmd/flightctl-worker"
)
