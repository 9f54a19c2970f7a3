// Command quickstart replays the "before vs after" of a popular task: many
// concurrent requests for one task that takes a slow query to load, served
// with no cache, with a naive cache-aside (GET, on a miss query and SET),
// and with cacheaside. It prints what each costs the database.
//
//	go -C examples run ./quickstart              # embedded Redis (miniredis)
//	go -C examples run ./quickstart -redis 127.0.0.1:6379
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

type Task struct {
	ID       int64    `json:"id"`
	Title    string   `json:"title"`
	Assignee string   `json:"assignee"`
	Org      string   `json:"org"`
	Tags     []string `json:"tags"`
}

// db simulates the source of truth: every query takes latency and is counted.
type db struct {
	latency time.Duration
	queries atomic.Int64
}

func (d *db) getTask(ctx context.Context, id int64) (Task, error) {
	d.queries.Add(1)
	select {
	case <-time.After(d.latency):
	case <-ctx.Done():
		return Task{}, ctx.Err()
	}
	if id != 42 {
		return Task{}, cacheaside.ErrNotFound
	}
	return Task{ID: id, Title: "Design caching layer", Assignee: "Alice", Org: "Acme Corp", Tags: []string{"backend", "performance"}}, nil
}

type row struct {
	name    string
	elapsed time.Duration
	queries int64
	failed  int64
}

// burst runs n concurrent requests through get and measures them.
func burst(name string, n int, d *db, get func(context.Context) error) row {
	d.queries.Store(0)
	var wg sync.WaitGroup
	var failed atomic.Int64
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if err := get(context.Background()); err != nil && !errors.Is(err, cacheaside.ErrNotFound) {
				failed.Add(1)
			}
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	return row{name, time.Since(t0), d.queries.Load(), failed.Load()}
}

func main() {
	var (
		addr     = flag.String("redis", "", "Redis address; empty starts an embedded miniredis")
		latency  = flag.Duration("db-latency", 50*time.Millisecond, "simulated database query time")
		requests = flag.Int("requests", 200, "concurrent requests per scenario")
	)
	flag.Parse()
	if *requests < 1 || *latency < 0 {
		fmt.Fprintln(os.Stderr, "quickstart: -requests must be ≥ 1 and -db-latency ≥ 0")
		os.Exit(2)
	}
	where := *addr
	if where == "" {
		mr, err := miniredis.Run()
		if err != nil {
			log.Fatal(err)
		}
		defer mr.Close()
		where = mr.Addr()
	}
	rdb := redis.NewClient(&redis.Options{Addr: where, ContextTimeoutEnabled: true, PoolSize: 64})
	defer rdb.Close()
	ctx := context.Background()
	if err := rdb.Ping(ctx).Err(); err != nil {
		log.Fatalf("quickstart: Redis at %s: %v", where, err)
	}
	d := &db{latency: *latency}
	keys := cacheaside.MustKeyspace("quickstart-tasks", 1)
	key := keys.Key("42")
	defer rdb.Del(ctx, key)

	var rows []row
	rows = append(rows, burst("no cache", *requests, d, func(ctx context.Context) error {
		_, err := d.getTask(ctx, 42)
		return err
	}))

	rdb.Del(ctx, key)
	rows = append(rows, burst("naive cache-aside (GET, miss → query + SET)", *requests, d, func(ctx context.Context) error {
		if b, err := rdb.Get(ctx, key).Bytes(); err == nil {
			var t Task
			return json.Unmarshal(b, &t)
		}
		t, err := d.getTask(ctx, 42)
		if err != nil {
			return err
		}
		b, _ := json.Marshal(t)
		return rdb.Set(ctx, key, b, 5*time.Minute).Err()
	}))

	rdb.Del(ctx, key)
	tasks, err := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "task"})
	if err != nil {
		log.Fatal(err)
	}
	defer tasks.Close()
	load := func(ctx context.Context) (Task, error) { return d.getTask(ctx, 42) }
	rows = append(rows, burst("cacheaside, cold key", *requests, d, func(ctx context.Context) error {
		_, err := tasks.Get(ctx, key, load)
		return err
	}))
	rows = append(rows, burst("cacheaside, warm key", *requests, d, func(ctx context.Context) error {
		_, err := tasks.Get(ctx, key, load)
		return err
	}))

	fmt.Printf("%d concurrent requests for one task, database query %v, Redis %s\n\n", *requests, *latency, redisLabel(*addr))
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "scenario\trequests\ttotal time\ttotal ÷ requests\tDB queries\tfailed\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%d\t%v\t%v\t%d\t%d\t\n", r.name, *requests, r.elapsed.Round(time.Microsecond),
			(r.elapsed / time.Duration(*requests)).Round(time.Microsecond), r.queries, r.failed)
	}
	w.Flush()
	s := tasks.Stats()
	fmt.Printf("\ncacheaside stats: hits=%d misses=%d hit rate=%.1f%% loads=%d shared in-process=%d\n",
		s.Hits, s.Misses, 100*s.HitRate(), s.Loads, s.Coalesced)
	fmt.Println("\nThe naive version misses on every request that arrives before the first SET,")
	fmt.Println("so a cold popular key costs one query per request; cacheaside lets one load run")
	fmt.Println("and the rest wait for its result.")
}

func redisLabel(addr string) string {
	if addr == "" {
		return "embedded (miniredis)"
	}
	return addr
}
