package cachetest_test

import (
	"context"
	"fmt"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/cachetest"
)

// exampleT stands in for the *testing.T a test has.
type exampleT struct{ cleanups []func() }

func (t *exampleT) Helper()                           {}
func (t *exampleT) Cleanup(f func())                  { t.cleanups = append(t.cleanups, f) }
func (t *exampleT) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
func (t *exampleT) done() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}

// In a test, pass its *testing.T instead of t.
func Example() {
	t := &exampleT{}
	defer t.done()

	rdb, mr := cachetest.Redis(t)
	clock := cachetest.NewClock(mr)
	tasks := cachetest.New(t, rdb, &cacheaside.Options[string]{
		Policy: cacheaside.Policy{TTL: time.Minute},
		Clock:  clock.Now,
	})
	load := cachetest.Value("write the docs")
	ctx := context.Background()

	_, _ = tasks.Get(ctx, "v1:tasks:42", load.Loader)
	_, _ = tasks.Get(ctx, "v1:tasks:42", load.Loader)
	fmt.Println("loads after two Gets:", load.Calls())

	clock.Advance(time.Hour) // past the TTL, in the cache and in Redis
	fmt.Println("still in Redis:", mr.Exists("v1:tasks:42"))
	_, _ = tasks.Get(ctx, "v1:tasks:42", load.Loader)
	fmt.Println("loads after the TTL:", load.Calls())
	// Output:
	// loads after two Gets: 1
	// still in Redis: false
	// loads after the TTL: 2
}
