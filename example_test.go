package cacheaside_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

type Task struct {
	ID    int64  `json:"id"`
	Title string `json:"title"`
}

// An in-memory Redis (miniredis) stands in for a real server, so the
// examples run anywhere; use redis.NewClient with your address instead.
// exampleBudget gives the examples that count their loads a 1 s budget
// per Redis command instead of 50 ms: their in-memory Redis runs in the
// test process, and on a starved CI core a late reply would make a Get
// load without Redis and the printed counts differ. A real program keeps
// the default.
var exampleBudget = cacheaside.Degradation{OpTimeout: time.Second}

func exampleRedis() (*redis.Client, func()) {
	mr, err := miniredis.Run()
	if err != nil {
		panic(err)
	}
	rdb := redis.NewClient(cacheaside.Recommended(&redis.Options{Addr: mr.Addr()}))
	return rdb, func() { rdb.Close(); mr.Close() }
}

func Example() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()

	tasks, err := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{
		Name:        "task",
		Policy:      cacheaside.Policy{TTL: 5 * time.Minute, NegativeTTL: time.Minute},
		Degradation: exampleBudget,
	})
	if err != nil {
		panic(err)
	}
	defer tasks.Close()
	keys := cacheaside.MustKeyspace("tasks", 1)

	queries := 0
	load := func(ctx context.Context) (Task, error) {
		queries++ // stands in for SELECT ... FROM tasks WHERE id = 42
		return Task{ID: 42, Title: "Design caching layer"}, nil
	}
	for i := 0; i < 3; i++ {
		t, err := tasks.Get(ctx, keys.Key("42"), load)
		if err != nil {
			panic(err)
		}
		fmt.Println(t.Title)
	}
	s := tasks.Stats()
	fmt.Printf("queries=%d hits=%d misses=%d hit rate=%.0f%%\n", queries, s.Hits, s.Misses, 100*s.HitRate())
	// Output:
	// Design caching layer
	// Design caching layer
	// Design caching layer
	// queries=1 hits=2 misses=1 hit rate=67%
}

// A loader that returns ErrNotFound has its answer cached for the
// policy's NegativeTTL, so repeated lookups of a missing id stay off the
// database.
func ExampleCache_Get_notFound() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	tasks, _ := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "task"})
	defer tasks.Close()

	queries := 0
	load := func(ctx context.Context) (Task, error) {
		queries++
		return Task{}, cacheaside.ErrNotFound // or map sql.ErrNoRows with Options.IsNotFound
	}
	for i := 0; i < 100; i++ {
		if _, err := tasks.Get(ctx, "v1:tasks:999999", load); !errors.Is(err, cacheaside.ErrNotFound) {
			panic(err)
		}
	}
	fmt.Println("lookups: 100, queries:", queries)
	// Output:
	// lookups: 100, queries: 1
}

// Invalidate after the write commits; the next Get loads the new row.
func ExampleCache_Invalidate() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	tasks, _ := cacheaside.New[Task](rdb, nil)
	defer tasks.Close()
	keys := cacheaside.MustKeyspace("tasks", 1)

	db := map[int64]string{42: "Design caching layer"}
	load := func(ctx context.Context) (Task, error) { return Task{ID: 42, Title: db[42]}, nil }

	t, _ := tasks.Get(ctx, keys.Key("42"), load)
	fmt.Println(t.Title)

	db[42] = "Ship caching layer" // UPDATE tasks SET title = ... WHERE id = 42; COMMIT
	if _, err := tasks.Invalidate(ctx, keys.Key("42")); err != nil {
		fmt.Println("invalidate failed; the entry lives until its TTL:", err)
	}
	t, _ = tasks.Get(ctx, keys.Key("42"), load)
	fmt.Println(t.Title)
	// Output:
	// Design caching layer
	// Ship caching layer
}

func ExampleKeyspace() {
	tasks := cacheaside.MustKeyspace("tasks", 1)
	fmt.Println(tasks.Key("42"))
	fmt.Println(tasks.Key("org", "acme", "status", "done", "page", "2", "size", "20"))
	fmt.Println(tasks.Key("org", "evil:*"))  // data cannot add structure or globs
	fmt.Println(tasks.Prefix("org", "acme")) // what InvalidatePrefix takes
	// Output:
	// v1:tasks:42
	// v1:tasks:org:acme:status:done:page:2:size:20
	// v1:tasks:org:evil%3A%2A
	// v1:tasks:org:acme:
}

func ExampleTTLTable_WithOverrides() {
	ttls, err := cacheaside.NewTTLTable(map[string]cacheaside.Policy{
		"task":      {TTL: 5 * time.Minute, NegativeTTL: time.Minute},
		"task_list": {TTL: time.Minute},
	})
	if err != nil {
		panic(err)
	}
	// An application would pass os.Getenv("CACHE_TTLS").
	ttls, err = ttls.WithOverrides("task=2m,task_list=30s")
	if err != nil {
		panic(err)
	}
	fmt.Println(ttls.Get("task").TTL, ttls.Get("task_list").TTL)
	_, err = ttls.WithOverrides("tsk=2m")
	fmt.Println(err)
	// Output:
	// 2m0s 30s
	// cacheaside: invalid options: TTL override "tsk=2m": no policy "tsk" (have task, task_list)
}

// Redis Cluster and Sentinel need no special setup: the clients satisfy
// cacheaside.Redis. (Compiles only; needs the servers to run.)
func ExampleNew_clusterAndSentinel() {
	cluster := redis.NewClusterClient(cacheaside.Recommended(&redis.ClusterOptions{
		Addrs: []string{"127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"},
	}))
	_, _ = cacheaside.New[Task](cluster, &cacheaside.Options[Task]{Name: "task"})

	failover := redis.NewFailoverClient(cacheaside.Recommended(&redis.FailoverOptions{
		MasterName:    "mymaster",
		SentinelAddrs: []string{"127.0.0.1:26379"},
	}))
	_, _ = cacheaside.New[Task](failover, &cacheaside.Options[Task]{Name: "task"})
}

// A namespace groups keys that are invalidated together: here every cached
// list page of one org. One InvalidateNamespace drops them all, however
// many there are, and a Get reads the entry and the namespace's generation
// with one MGET.
func ExampleCache_InvalidateNamespace() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	lists, _ := cacheaside.New[[]int64](rdb, &cacheaside.Options[[]int64]{Name: "task_list", Namespaced: true,
		Degradation: exampleBudget})
	defer lists.Close()
	keyspace := cacheaside.MustKeyspace("task_lists", 1)

	acme := keyspace.Namespace("org", "acme")
	fmt.Println(acme.Key("status", "done", "page", "1"))

	queries := 0
	load := func(ctx context.Context) ([]int64, error) { queries++; return []int64{1, 2, 3}, nil }
	for page := 1; page <= 3; page++ {
		_, _ = lists.Get(ctx, acme.Key("status", "done", "page", fmt.Sprint(page)), load)
		_, _ = lists.Get(ctx, acme.Key("status", "done", "page", fmt.Sprint(page)), load)
	}
	fmt.Println("queries before the write:", queries)

	// A task of acme changed: drop every list page of acme.
	if err := lists.InvalidateNamespace(ctx, acme); err != nil {
		panic(err)
	}
	for page := 1; page <= 3; page++ {
		_, _ = lists.Get(ctx, acme.Key("status", "done", "page", fmt.Sprint(page)), load)
	}
	fmt.Println("queries after the write:", queries)
	// Output:
	// v1:task_lists:{org:acme}:status:done:page:1
	// queries before the write: 3
	// queries after the write: 6
}

// With a stale-while-revalidate window, a value past its TTL is still
// served at once while one background refresh replaces it.
func ExamplePolicy_staleWhileRevalidate() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }

	stats, _ := cacheaside.New[int](rdb, &cacheaside.Options[int]{
		Name:        "org_stats",
		Policy:      cacheaside.Policy{TTL: 2 * time.Minute, StaleWhileRevalidate: time.Minute},
		Clock:       clock, // a real program leaves this at its default, time.Now
		Degradation: exampleBudget,
	})
	defer stats.Close()

	refreshed := make(chan struct{})
	version := 0
	load := func(ctx context.Context) (int, error) {
		version++
		if version == 2 {
			defer close(refreshed)
		}
		return version, nil
	}
	v, _ := stats.Get(ctx, "v1:org_stats:acme", load)
	fmt.Println("first:", v)

	mu.Lock()
	now = now.Add(150 * time.Second) // past the TTL, inside the window
	mu.Unlock()
	v, _ = stats.Get(ctx, "v1:org_stats:acme", load)
	fmt.Println("stale, served at once:", v)

	<-refreshed
	for stats.Stats().Refreshes == 0 {
		time.Sleep(time.Millisecond)
	}
	v, _ = stats.Get(ctx, "v1:org_stats:acme", load)
	fmt.Println("after the background refresh:", v)
	// Output:
	// first: 1
	// stale, served at once: 1
	// after the background refresh: 2
}

// GetMany reads many ids in one round trip and loads all the misses with
// one call; ids the loader leaves out are cached as "not found".
func ExampleGetMany() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	tasks, err := cacheaside.New[Task](rdb, nil)
	if err != nil {
		panic(err)
	}
	defer tasks.Close()
	keys := cacheaside.MustKeyspace("tasks", 1)
	key := func(id int64) string { return keys.Key(fmt.Sprint(id)) }

	db := map[int64]Task{1: {1, "Write docs"}, 2: {2, "Ship it"}, 3: {3, "Celebrate"}}
	load := func(ctx context.Context, ids []int64) (map[int64]Task, error) {
		fmt.Println("query ids", ids) // SELECT ... WHERE id = ANY($1)
		found := make(map[int64]Task)
		for _, id := range ids {
			if t, ok := db[id]; ok {
				found[id] = t
			}
		}
		return found, nil
	}
	if _, err := cacheaside.GetMany(ctx, tasks, []int64{1, 2}, key, load); err != nil {
		panic(err)
	}
	got, err := cacheaside.GetMany(ctx, tasks, []int64{1, 2, 3, 4}, key, load)
	if err != nil {
		panic(err)
	}
	fmt.Println(len(got), got[3].Title)
	_, err = cacheaside.GetMany(ctx, tasks, []int64{1, 2, 3, 4}, key, load) // all cached, 4 as "not found"
	fmt.Println(err)
	// Output:
	// query ids [1 2]
	// query ids [3 4]
	// 3 Celebrate
	// <nil>
}

// GetOptions{Reload: true} loads again what is cached; a reload's loader
// finds the old value with Reloading, and a value that comes back the same
// is kept, not sent again.
func ExampleReloading() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	tasks, err := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "task", Degradation: exampleBudget})
	if err != nil {
		panic(err)
	}
	defer tasks.Close()
	key := cacheaside.MustKeyspace("tasks", 1).Key("42")

	load := func(ctx context.Context) (Task, error) {
		if old, ok := cacheaside.Reloading[Task](ctx); ok {
			// A conditional request would go here; the row has not changed.
			fmt.Println("reloading, old title:", old.Value.Title)
			return old.Value, nil
		}
		return Task{ID: 42, Title: "Design caching layer"}, nil
	}
	if _, err := tasks.Get(ctx, key, load); err != nil {
		panic(err)
	}
	if _, err := tasks.Get(ctx, key, load, cacheaside.GetOptions{Reload: true}); err != nil {
		panic(err)
	}
	p, _ := tasks.Peek(ctx, key)
	fmt.Println(p.State, p.Value.Title, "unchanged reloads:", tasks.Stats().Unchanged)
	// Output:
	// reloading, old title: Design caching layer
	// fresh Design caching layer unchanged reloads: 1
}

// SetMany warms a cache with values read in bulk; Peek shows what a key
// holds without loading it.
func ExampleCache_SetMany() {
	rdb, stop := exampleRedis()
	defer stop()
	ctx := context.Background()
	tasks, err := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "task", Degradation: exampleBudget})
	if err != nil {
		panic(err)
	}
	defer tasks.Close()
	keys := cacheaside.MustKeyspace("tasks", 1)

	rows := []Task{{ID: 1, Title: "Write the schema"}, {ID: 2, Title: "Seed the database"}}
	vals := make(map[string]Task, len(rows))
	for _, t := range rows {
		vals[keys.Key(fmt.Sprint(t.ID))] = t
	}
	written, err := tasks.SetMany(ctx, vals)
	fmt.Println("written:", written, err)
	for _, id := range []string{"1", "2", "3"} {
		p, err := tasks.Peek(ctx, keys.Key(id))
		fmt.Println(id, p.State, p.Value.Title, err)
	}
	// Output:
	// written: 2 <nil>
	// 1 fresh Write the schema <nil>
	// 2 fresh Seed the database <nil>
	// 3 absent  <nil>
}
