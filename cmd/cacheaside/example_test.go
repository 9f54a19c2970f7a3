package main

import (
	"context"
	"os"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// A cache fills an entry; the command invalidates it as the library does,
// bus message included, and inspect then finds nothing.
func Example() {
	mr := miniredis.NewMiniRedis()
	_ = mr.Start()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	// A local tier subscribes to the cache's bus: the command's message
	// reaches it.
	tasks, _ := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "task", Local: &cacheaside.LocalOptions{}})
	defer tasks.Close()
	ctx := context.Background()
	_ = tasks.WaitLocal(ctx)
	_, _ = tasks.Get(ctx, "v1:tasks:42", func(context.Context) (string, error) { return "write the docs", nil })

	url := "redis://" + mr.Addr() + "/0"
	run(ctx, []string{"--redis", url, "invalidate", "--cache", "task", "key", "v1:tasks:42"}, os.Stdout, os.Stdout)
	run(ctx, []string{"--redis", url, "inspect", "v1:tasks:42"}, os.Stdout, os.Stdout)
	// Output:
	// deleted 1 of 1 key
	// published on cacheaside:invalidate:task to 1 subscriber
	// cacheaside inspect: v1:tasks:42: no such key
}
