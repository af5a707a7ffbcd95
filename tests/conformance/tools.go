//go:build tools

// Package tools records what `make conformance` builds from the pinned modules, so that
// `go mod tidy` keeps their dependencies in go.sum: the e2e suite (built with `go test -c`)
// agnhost, the suite's multi-purpose test image, and ginkgo, which runs the suite in parallel.
package tools

import (
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "k8s.io/kubernetes/test/e2e"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
