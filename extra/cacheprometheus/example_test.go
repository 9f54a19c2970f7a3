package cacheprometheus_test

import (
	"context"
	"fmt"
	"strings"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheprometheus"
)

// Register one Collector for every cache of the process; a scrape reads
// their Stats.
func Example() {
	mr := miniredis.NewMiniRedis()
	_ = mr.Start()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()

	tasks, _ := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks"})
	defer tasks.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(cacheprometheus.NewCollector("", tasks))

	ctx := context.Background()
	for range 4 {
		_, _ = tasks.Get(ctx, "v1:tasks:42", func(context.Context) (string, error) { return "write the docs", nil })
	}

	err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP cacheaside_requests_total Gets by the outcome of their first read: hit (a value, from Redis or the local tier), negative_hit (a "not found" tombstone) or miss. A GetMany counts once per distinct key.
# TYPE cacheaside_requests_total counter
cacheaside_requests_total{cache="tasks",result="hit"} 3
cacheaside_requests_total{cache="tasks",result="miss"} 1
cacheaside_requests_total{cache="tasks",result="negative_hit"} 0
`), "cacheaside_requests_total")
	fmt.Println("scrape as expected:", err == nil)
	// Output: scrape as expected: true
}
