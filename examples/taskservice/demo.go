package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
)

// runDemo reproduces the lecture's demos on the real service: its store
// (SQLite or PostgreSQL) slowed down by -db-latency, its caches, and
// Redis. Every number it prints is measured in this run.
func runDemo(out io.Writer, args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	latency := fs.Duration("db-latency", 50*time.Millisecond, "simulated database query time")
	requests := fs.Int("requests", 200, "concurrent requests for one task (part 1)")
	lookups := fs.Int("lookups", 1000, "lookups of a missing task (part 5.2)")
	serve := fs.Bool("serve", false, "serve the API and the dashboard (http://ADDR/admin/) while the demo runs, pause between parts, and keep serving after it until interrupted")
	pause := fs.Duration("pause", 3*time.Second, "with -serve, the pause between parts, so each shows apart on the dashboard")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *requests < 1 || *lookups < 1 || *latency < 0 {
		return errors.New("demo: -requests and -lookups must be ≥ 1, -db-latency ≥ 0")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	quiet := slog.New(slog.DiscardHandler)
	e := readEnv()
	a, err := newApp(ctx, e, quiet, *latency, "demo.")
	if err != nil {
		return err
	}
	defer a.Close()
	var queries atomic.Int64
	a.store.queries = func() { queries.Add(1) }
	d := demo{out: out, progressOut: os.Stderr, app: a, queries: &queries, redisName: appRedis(e.redisURL, a.rdb)}
	if *serve {
		srv := &http.Server{Addr: e.addr, Handler: a.Handler, ReadHeaderTimeout: 5 * time.Second}
		errc := make(chan error, 1)
		go func() { errc <- srv.ListenAndServe() }()
		defer srv.Close()
		select {
		case err := <-errc:
			return fmt.Errorf("demo -serve: listening on %s (ADDR): %w", e.addr, err)
		case <-time.After(100 * time.Millisecond):
		}
		d.pause = *pause
		fmt.Fprintf(out, "dashboard: http://%s/admin/ (open it now to watch the parts happen)\n", e.addr)
	}

	fmt.Fprintf(out, "taskservice demo: database %s with %v added to every query, Redis %s\n",
		a.store.dialect, *latency, redisLabel(e.redisURL))
	for _, part := range []struct {
		name string
		run  func() error
	}{
		{"part 1 (stampede)", func() error { return d.part1(ctx, *requests) }},
		{"part 4.3 (pattern invalidation: SCAN against a tag invalidation)", func() error { return d.part43(ctx) }},
		{"part 4.4 (the staleness trade-off: dashboard stats on TTL only)", func() error { return d.part44(ctx) }},
		{"part 4.5 (durable invalidation: a writer dies after its commit)", func() error { return d.part45(ctx) }},
		{"part 4.6 (change data capture: a write from outside the app)", func() error { return d.part46(ctx) }},
		{"part 4.7 (a longer TTL, once invalidation is durable)", func() error { return d.part47(ctx) }},
		{"part 5.2 (cache penetration)", func() error { return d.part52(ctx, *lookups) }},
		{"part 5.3 (Redis stops)", func() error { return d.part53(ctx, *latency) }},
		{"part 5.4 (a slow database: the soft load timeout)", func() error { return d.part54(ctx) }},
	} {
		d.progress("running %s…", part.name)
		d.redis, d.step = d.redisName, "start"
		if err := part.run(); err != nil {
			return fmt.Errorf("demo %s, step %q, on Redis %s: %w", part.name, d.step, d.redis, explainTimeout(err, d.redisTimeout()))
		}
		if d.pause > 0 {
			time.Sleep(d.pause)
		}
	}
	if *serve {
		fmt.Fprintf(out, "\ndemo done; still serving the API and http://%s/admin/ until interrupted (Ctrl-C)\n", e.addr)
		<-ctx.Done()
	}
	return nil
}

// progress says which part runs, one line per part, on stderr, so the
// tables on stdout stay clean when captured.
func (d *demo) progress(format string, args ...any) {
	fmt.Fprintf(d.progressOut, "  … "+format+"\n", args...)
}

type demo struct {
	out         io.Writer
	progressOut io.Writer // where progress lines go: stderr
	app         *app
	queries     *atomic.Int64
	pause       time.Duration // between parts, with -serve

	// Where a part is, for its error: the step it runs and the Redis that
	// step uses (redisName, the app's, unless the part runs its own).
	step, redis, redisName string
	rdb                    *redis.Client // the client of redis
}

// at names the step a part runs from now on, and the Redis it uses.
func (d *demo) at(step string) { d.step = step }

// appRedis names the app's Redis in errors: embedded or REDIS_URL, and
// where.
func appRedis(url string, rdb *redis.Client) string {
	return fmt.Sprintf("%s at %s", redisLabel(url), rdb.Options().Addr)
}

// redisTimeout is the read timeout of the client the current step uses.
func (d *demo) redisTimeout() time.Duration {
	rdb := d.app.rdb
	if d.rdb != nil {
		rdb = d.rdb
	}
	return rdb.Options().ReadTimeout
}

// explainTimeout says what a timeout means: a reply Redis did not send in
// time. Other errors are returned as they are.
func explainTimeout(err error, read time.Duration) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w (no reply within the client's ReadTimeout of %v or the step's own deadline)", err, read)
	}
	return err
}

// result is one row of a table.
type result struct {
	name     string
	requests int
	total    time.Duration
	latency  time.Duration // mean per request
	queries  int64
	failed   int64
}

// burst runs n calls of get, all at once, or at most slots at a time when
// slots > 0 (clients that each wait for their previous answer), and
// measures them. A call's latency runs from when it is sent, after its
// slot is free: waiting for a slot is the client's queue, not the
// server's time.
func (d *demo) burst(name string, n, slots int, get func(context.Context, int) error) result {
	d.queries.Store(0)
	var wg sync.WaitGroup
	var failed, lat atomic.Int64
	start := make(chan struct{})
	var sem chan struct{}
	if slots > 0 {
		sem = make(chan struct{}, slots)
	}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if sem != nil {
				sem <- struct{}{}
				defer func() { <-sem }()
			}
			t0 := time.Now()
			if err := get(context.Background(), i); err != nil && !errors.Is(err, cacheaside.ErrNotFound) {
				failed.Add(1)
			}
			lat.Add(int64(time.Since(t0)))
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	return result{name, n, time.Since(t0), time.Duration(lat.Load() / int64(n)), d.queries.Load(), failed.Load()}
}

func (d *demo) table(rows []result) {
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\tRequests\tTotal time\tAvg latency\tDB queries\tFailed\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%d\t%v\t%v\t%d\t%d\t\n", r.name, r.requests, roundDur(r.total), roundDur(r.latency), r.queries, r.failed)
	}
	w.Flush()
}

// roundDur keeps three significant digits or so: 55.2ms, 1.61ms, 4.3µs.
func roundDur(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond)
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	case d >= 10*time.Microsecond:
		return d.Round(100 * time.Nanosecond)
	}
	return d.Round(10 * time.Nanosecond)
}

// naiveGet is the lecture's first cache-aside (3.3): GET; on a miss, query
// and SET. No stampede control, no negative caching.
func (d *demo) naiveGet(ctx context.Context, key string, id int64) error {
	rdb := d.app.rdb
	if b, err := rdb.Get(ctx, key).Bytes(); err == nil {
		if string(b) == "null" {
			return nil
		}
		var t Task
		return json.Unmarshal(b, &t)
	}
	t, err := d.app.store.GetTask(ctx, id)
	if err != nil {
		return err // "not found" is not cached: every lookup queries again
	}
	b, _ := json.Marshal(t)
	return rdb.Set(ctx, key, b, 5*time.Minute).Err()
}

// part1 is lecture 1.1 and 5.1: many concurrent requests for one task.
func (d *demo) part1(ctx context.Context, n int) error {
	const id = 42
	svc := d.app.svc
	naiveKey := "demo:naive:tasks:42"
	d.at("delete the demo's keys of task 42")
	if err := d.app.rdb.Del(ctx, naiveKey, svc.taskKey(id)).Err(); err != nil {
		return err
	}
	// The same entries read without the task cache's local tier: every
	// hit is one Redis GET.
	redisOnly, err := cacheaside.New[Task](d.app.rdb, &cacheaside.Options[Task]{Name: "task-redis-only", Policy: defaultTTLs.Get("task")})
	if err != nil {
		return err
	}
	defer redisOnly.Close()
	rows := []result{
		d.burst("No cache", n, 0, func(ctx context.Context, _ int) error {
			_, err := d.app.store.GetTask(ctx, id)
			return err
		}),
		d.burst("Naive cache-aside (GET, miss → query + SET), cold", n, 0, func(ctx context.Context, _ int) error {
			return d.naiveGet(ctx, naiveKey, id)
		}),
		d.burst("cacheaside, cold key", n, 0, func(ctx context.Context, _ int) error {
			_, err := svc.GetTask(ctx, id)
			return err
		}),
		d.burst("cacheaside, warm key, Redis tier", n, 0, func(ctx context.Context, _ int) error {
			_, err := redisOnly.Get(ctx, svc.taskKey(id), func(ctx context.Context) (Task, error) { return d.app.store.GetTask(ctx, id) })
			return err
		}),
		d.burst("cacheaside, warm key, local tier", n, 0, func(ctx context.Context, _ int) error {
			_, err := svc.GetTask(ctx, id)
			return err
		}),
	}
	d.at("delete the naive cache's key")
	if err := d.app.rdb.Del(ctx, naiveKey).Err(); err != nil {
		return err
	}
	fmt.Fprintf(d.out, "\nPart 1 (lecture 1.1, 5.1): %d concurrent requests for task %d\n\n", n, id)
	d.table(rows)
	fmt.Fprintf(d.out, "\nThe naive cache misses on every request that arrives before the first SET: a cold\n"+
		"popular key costs %d queries, not 1. cacheaside runs one load and the others wait for it.\n"+
		"Once warm, a Redis hit is one GET; the task cache's local tier answers from memory, kept\n"+
		"coherent with other instances by an invalidation bus on Redis pub/sub.\n", rows[1].queries)
	return nil
}

// part52 is lecture 5.2: lookups of an id that does not exist.
func (d *demo) part52(ctx context.Context, n int) error {
	const missing = 999999
	naiveKey := "demo:naive:tasks:999999"
	d.at("delete the demo's keys of task 999999")
	if err := d.app.rdb.Del(ctx, naiveKey, d.app.svc.taskKey(missing)).Err(); err != nil {
		return err
	}
	const clients = 20 // asking in a loop, each waiting for its answer
	rows := []result{
		d.burst("Without negative caching", n, clients, func(ctx context.Context, _ int) error {
			return d.naiveGet(ctx, naiveKey, missing)
		}),
		d.burst("With negative caching", n, clients, func(ctx context.Context, _ int) error {
			_, err := d.app.svc.GetTask(ctx, missing)
			return err
		}),
	}
	fmt.Fprintf(d.out, "\nPart 5.2 (cache penetration): %d lookups of task %d, which does not exist, 20 at a time\n\n", n, missing)
	d.table(rows)
	return nil
}

// part53 is lecture 5.3: Redis stops in the middle of a run. It uses its
// own embedded Redis, so the demo can stop it whatever REDIS_URL says.
func (d *demo) part53(ctx context.Context, latency time.Duration) error {
	d.at("start its own embedded Redis")
	mr, err := miniredis.Run()
	if err != nil {
		return err
	}
	defer mr.Close()
	rdb := redis.NewClient(cacheaside.Recommended(&redis.Options{Addr: mr.Addr()}))
	defer rdb.Close()
	d.redis, d.rdb = "embedded (miniredis) of part 5.3 at "+mr.Addr(), rdb
	defer func() { d.rdb = nil }()
	d.at("build the task cache on it")
	ttls, _ := defaultTTLs.WithOverrides(readEnv().cacheTTLs)
	// No local tier here: this part is about every read going to a Redis
	// that fails (a local tier would answer from memory until its bus
	// noticed the outage).
	defer d.keepTargets()()
	svc, err := NewService(d.app.store, rdb, ttls, slog.New(slog.DiscardHandler), "demo53.", 0)
	if err != nil {
		return err
	}
	defer svc.Close()
	// On the dashboard as a cache of its own: its breaker opens when this
	// part stops its Redis.
	d.app.mon.add("task (part 5.3, Redis stopped halfway)", svc.tasks, false)

	d.at("10 clients reading tasks while Redis stops halfway")
	const clients, perClient = 10, 40
	const total = clients * perClient
	ids := []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	var served, failed, afterStop, done atomic.Int64
	var stopped atomic.Bool
	d.queries.Store(0)
	var wg sync.WaitGroup
	t0 := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perClient; i++ {
				wasStopped := stopped.Load()
				if _, err := svc.GetTask(ctx, ids[(c+i)%len(ids)]); err != nil {
					failed.Add(1)
				} else {
					served.Add(1)
					if wasStopped {
						afterStop.Add(1)
					}
				}
				if done.Add(1) == total/2 {
					mr.Close() // Redis goes away after half the requests
					stopped.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	st := svc.tasks.Stats()
	fmt.Fprintf(d.out, "\nPart 5.3 (graceful degradation): %d clients × %d requests over %d tasks; Redis stopped halfway\n\n", clients, perClient, len(ids))
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "Requests\t%d\t\n", total)
	fmt.Fprintf(w, "Served\t%d\t(%d after Redis stopped)\n", served.Load(), afterStop.Load())
	fmt.Fprintf(w, "Failed\t%d\t\n", failed.Load())
	fmt.Fprintf(w, "Cache hits / misses\t%d / %d\t\n", st.Hits, st.Misses)
	fmt.Fprintf(w, "Redis commands failed\t%d\t(sent and failed; each request that met one was answered from the database, concurrent ones sharing a query)\n", st.RedisErrors)
	fmt.Fprintf(w, "Redis commands skipped\t%d\t(not sent while the circuit breaker was open)\n", st.RedisSkipped)
	fmt.Fprintf(w, "DB queries\t%d\t(%v each)\n", d.queries.Load(), latency)
	fmt.Fprintf(w, "Total time\t%v\t\n", elapsed.Round(time.Millisecond))
	w.Flush()
	return nil
}

// part54 is graceful degradation when the database is slow rather than
// down: org stats past their TTL, inside StaleIfError, whose reload takes
// a second. With a 100 ms SoftLoadTimeout the requests get the old figures
// after 100 ms and the reload fills in the background; without, every
// request waits for the reload. Each run has its own cache and keys.
func (d *demo) part54(ctx context.Context) error {
	const org, n = "acme", 50
	const ttl, slow, soft = 200 * time.Millisecond, time.Second, 100 * time.Millisecond
	policy := cacheaside.Policy{TTL: ttl, StaleIfError: time.Hour, NoJitter: true, NoEarlyRefresh: true}
	type run struct {
		name                     string
		soft                     time.Duration
		p50, max                 time.Duration
		old, queries, softAnswer int64
		after                    time.Duration // the next request, once the reload has filled
	}
	runs := []*run{{name: fmt.Sprintf("SoftLoadTimeout %v", soft), soft: soft}, {name: "no SoftLoadTimeout"}}
	for i, r := range runs {
		d.at(fmt.Sprintf("build the org stats cache (%s)", r.name))
		c, err := cacheaside.New(d.app.rdb, &cacheaside.Options[OrgStats]{Name: fmt.Sprintf("demo54_%d", i), Policy: policy, SoftLoadTimeout: r.soft, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return err
		}
		key := cacheaside.MustKeyspace(fmt.Sprintf("demo54.%d.%d", time.Now().UnixNano(), i), 1).Key(org)
		var slowNow atomic.Bool
		var queries atomic.Int64
		load := func(ctx context.Context) (OrgStats, error) {
			queries.Add(1)
			st, err := d.app.store.OrgStats(ctx, org)
			if err == nil && slowNow.Load() {
				select { // the database under load
				case <-time.After(slow):
				case <-ctx.Done():
					return OrgStats{}, ctx.Err()
				}
			}
			return st, err
		}
		d.at(fmt.Sprintf("fill, then %d requests once the TTL has passed (%s)", n, r.name))
		first, err := c.Get(ctx, key, load)
		if err != nil {
			c.Close()
			return err
		}
		time.Sleep(ttl + 50*time.Millisecond)
		slowNow.Store(true)
		queries.Store(0)
		lat := make([]time.Duration, n)
		var wg sync.WaitGroup
		var old, failed atomic.Int64
		for g := range n {
			wg.Go(func() {
				t0 := time.Now()
				st, err := c.Get(ctx, key, load)
				lat[g] = time.Since(t0)
				switch {
				case err != nil:
					failed.Add(1)
				case st.Computed.Equal(first.Computed):
					old.Add(1)
				}
			})
		}
		wg.Wait()
		if f := failed.Load(); f > 0 {
			c.Close()
			return fmt.Errorf("%d of %d requests failed", f, n)
		}
		r.queries = queries.Load()
		slices.Sort(lat)
		r.p50, r.max, r.old = lat[n/2], lat[n-1], old.Load()
		d.at(fmt.Sprintf("the next request once the reload has filled (%s)", r.name))
		for deadline := time.Now().Add(slow + 10*time.Second); ; {
			t0 := time.Now()
			st, err := c.Get(ctx, key, load)
			r.after = time.Since(t0)
			if err != nil {
				c.Close()
				return err
			}
			if !st.Computed.Equal(first.Computed) {
				break // the reload's figures, from the cache
			}
			if time.Now().After(deadline) {
				c.Close()
				return fmt.Errorf("the reload did not fill within %v", slow+10*time.Second)
			}
			time.Sleep(20 * time.Millisecond)
		}
		r.softAnswer = int64(c.Stats().SoftTimeouts)
		c.Close()
	}
	fmt.Fprintf(d.out, "\nPart 5.4 (graceful degradation, a slow database): %d requests for org %s's stats past their %v TTL (inside StaleIfError); the reload takes %v more\n\n", n, org, ttl, slow)
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\tp50\tmax\tanswered with the old figures\tDB queries\tnext request, after the fill\t")
	for _, r := range runs {
		fmt.Fprintf(w, "%s\t%v\t%v\t%d of %d\t%d\t%v\t\n", r.name, roundDur(r.p50), roundDur(r.max), r.old, n, r.queries, roundDur(r.after))
	}
	w.Flush()
	fmt.Fprintf(d.out, "\nWith the soft timeout the reload went on in the background (soft timeouts counted: %d) and filled the new figures; the next request read them from the cache.\n", runs[0].softAnswer)
	return nil
}

// part43 is lecture 4.3's pattern invalidation: drop every cached list page
// of one org by SCAN (InvalidatePrefix) and by invalidating its tags (InvalidateTags), in a
// Redis that holds other keys too, as a production Redis does.
func (d *demo) part43(ctx context.Context) error {
	const org, filler = "acme", 20000
	svc, rdb := d.app.svc, d.app.rdb
	// Other data in the same Redis: SCAN must walk it all. Bulk work goes
	// in pipelines of a thousand commands, each with its own deadline, so
	// no single round trip waits for 20,000 replies.
	const chunk = 1000
	bulk := func(cmd func(p redis.Pipeliner, i int)) error {
		for i := 0; i < filler; i += chunk {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := rdb.Pipelined(pctx, func(p redis.Pipeliner) error {
				for j := i; j < min(i+chunk, filler); j++ {
					cmd(p, j)
				}
				return nil
			})
			cancel()
			if err != nil {
				return fmt.Errorf("keys %d–%d: %w", i, min(i+chunk, filler)-1, err)
			}
		}
		return nil
	}
	d.at(fmt.Sprintf("fill Redis with %d other keys, in pipelines of %d SETs", filler, chunk))
	if err := bulk(func(p redis.Pipeliner, i int) { p.Set(ctx, fmt.Sprintf("demo:other:%d", i), "x", 10*time.Minute) }); err != nil {
		return err
	}
	defer func() {
		if err := bulk(func(p redis.Pipeliner, i int) { p.Unlink(ctx, fmt.Sprintf("demo:other:%d", i)) }); err != nil {
			d.progress("part 4.3: removing the other keys from Redis %s failed (they expire in 10 minutes): %v", d.redis, err)
		}
	}()
	// The org's list pages: every status and page, two page sizes.
	pages := func() (int, error) {
		n := 0
		for _, status := range append([]string{""}, statuses...) {
			for _, size := range []int{10, 20} {
				for page := 1; page <= 25; page++ {
					if _, err := svc.ListTasks(ctx, org, 0, status, page, size); err != nil {
						return n, err
					}
					n++
				}
			}
		}
		return n, nil
	}
	d.at("cache every list page of org " + org)
	n, err := pages()
	if err != nil {
		return err
	}
	d.at("DBSIZE")
	dbsize, err := rdb.DBSize(ctx).Result()
	if err != nil {
		return err
	}
	prefix := svc.listKeys.Prefix("org", org)
	d.at("InvalidatePrefix " + prefix)
	t0 := time.Now()
	deleted, err := svc.lists.InvalidatePrefix(ctx, prefix)
	scanTook := time.Since(t0)
	if err != nil {
		return err
	}
	d.at("cache every list page of org " + org + " again")
	if _, err := pages(); err != nil {
		return err
	}
	d.at("InvalidateTags of org " + org + "'s lists")
	t0 = time.Now()
	if err := svc.InvalidateOrgLists(ctx, org); err != nil {
		return err
	}
	bumpTook := time.Since(t0)
	fmt.Fprintf(d.out, "\nPart 4.3 (pattern invalidation): drop the %d cached list pages of org %s, in a Redis of %d keys\n\n", n, org, dbsize)
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\tKeys dropped\tRedis work\tTime\t")
	fmt.Fprintf(w, "SCAN MATCH %s* + UNLINK (InvalidatePrefix)\t%d\tevery one of the %d keys visited, about %d SCAN calls\t%v\t\n", prefix, deleted, dbsize, (dbsize+999)/1000, roundDur(scanTook))
	fmt.Fprintf(w, "Tag invalidation (InvalidateTags)\t%d, unreachable\tone SET of a new random generation per tag; the old pages are misses from then on\t%v\t\n", n, roundDur(bumpTook))
	w.Flush()
	fmt.Fprintf(d.out, "\nSCAN's cost grows with the whole database, not with the pages it finds. The app's writes\n"+
		"invalidate the tags of the task's org and assignees; DELETE /admin/cache/{cache}?prefix= is there for\n"+
		"keys no tag covers, such as the entries an old key version left behind.\n")
	return nil
}

// part44 is lecture 4.4: how stale is acceptable is a business decision.
// The org dashboard's stats are cached on TTL only: no write invalidates
// them, so a new task shows up in them when the entry expires (or is
// refreshed in the background past it), not at once. The task and the
// org's list pages, which the same write invalidates, show it at once.
func (d *demo) part44(ctx context.Context) error {
	const org, reads = "acme", 20
	svc := d.app.svc
	d.at("delete org " + org + "'s cached stats")
	if err := d.app.rdb.Del(ctx, svc.statsKeys.Key(org)).Err(); err != nil {
		return err
	}
	type row struct {
		what    string
		total   int
		queries int64
	}
	var rows []row
	read := func(what string, n int) error {
		d.queries.Store(0)
		var st OrgStats
		for range n {
			var err error
			if st, err = svc.OrgStats(ctx, org); err != nil {
				return err
			}
		}
		rows = append(rows, row{what, st.Total, d.queries.Load()})
		return nil
	}
	d.at("read org " + org + "'s stats")
	if err := read("first read (a miss)", 1); err != nil {
		return err
	}
	if err := read(fmt.Sprintf("%d more reads", reads), reads); err != nil {
		return err
	}
	d.at("find a user of org " + org)
	tasks, err := d.orgTasks(ctx, org, 1)
	if err != nil {
		return err
	}
	d.at("create a task in org " + org)
	t, _, err := svc.CreateTask(ctx, TaskInput{Org: org, Title: "Demo task for part 4.4", Status: "todo", Assignee: tasks[0].Assignee})
	if err != nil {
		return err
	}
	d.at("read org " + org + "'s stats after the write")
	if err := read(fmt.Sprintf("%d reads after the write", reads), reads); err != nil {
		return err
	}
	d.at("read the new task")
	d.queries.Store(0)
	if _, err := svc.GetTask(ctx, t.ID); err != nil {
		return err
	}
	taskQueries := d.queries.Load()

	ttls, _ := defaultTTLs.WithOverrides(readEnv().cacheTTLs) // newApp checked them
	ttl := ttls.Get("org_stats").TTL
	fmt.Fprintf(d.out, "\nPart 4.4 (the staleness trade-off): org %s's dashboard stats, cached for %v with no invalidation\n\n", org, ttl)
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\tTasks in the stats\tDB queries\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%d\t%d\t\n", r.what, r.total, r.queries)
	}
	w.Flush()
	fmt.Fprintf(d.out, "\nThe write (task %d) invalidated its key and the org's list pages, so the new task\n"+
		"is read from the database at once (%d query). The stats still count the\n"+
		"tasks from before it: they are allowed to be %v old, which spares the database an\n"+
		"aggregate query on every dashboard view. Permissions are the opposite case: never cached.\n",
		t.ID, taskQueries, ttl)
	return nil
}

// part45 shows the outbox at work (beyond the lecture's 4.3): a write whose
// process dies right after its commit, before its invalidation. The old
// task stays cached and the staleness audit finds it; the write's outbox
// row, committed with it, is applied by the relay after its grace, and the
// audit then finds nothing stale.
func (d *demo) part45(ctx context.Context) error {
	const org, sample = "acme", 20
	svc := d.app.svc
	d.at("find a task of org " + org)
	tasks, err := d.orgTasks(ctx, org, 1)
	if err != nil {
		return err
	}
	t := tasks[0]
	d.at("read the task")
	if _, err := svc.GetTask(ctx, t.ID); err != nil {
		return err
	}
	type row struct {
		when, title string
		stale       int
		sampled     int
	}
	var rows []row
	look := func(when string) error {
		d.at("read the task and audit the task cache " + when)
		got, err := svc.GetTask(ctx, t.ID)
		if err != nil {
			return err
		}
		rep, err := svc.Audit(ctx, "task", sample)
		if err != nil {
			return err
		}
		rows = append(rows, row{when, got.Title, rep.Stale, rep.Sampled})
		return nil
	}
	d.at("update the task, then die before invalidating")
	svc.crashAfterCommit.Store(true)
	in := TaskInput{Title: "Edited by a writer that then died", Status: t.Status, Assignee: t.Assignee, Tags: t.Tags}
	_, _, err = svc.UpdateTask(ctx, t.ID, in)
	svc.crashAfterCommit.Store(false)
	if err != nil {
		return err
	}
	committed := time.Now()
	if err := look("right after the commit"); err != nil {
		return err
	}
	d.at("wait for the outbox's relay")
	for {
		got, err := svc.GetTask(ctx, t.ID)
		if err != nil {
			return err
		}
		if got.Title == in.Title {
			break
		}
		if time.Since(committed) > 30*time.Second {
			return fmt.Errorf("the relay did not apply the write's outbox row within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	applied := time.Since(committed)
	if err := look(fmt.Sprintf("after the relay (%v after the commit)", applied.Round(10*time.Millisecond))); err != nil {
		return err
	}
	fmt.Fprintf(d.out, "\nPart 4.5 (durable invalidation): task %d updated by a writer that died after its commit\n\n", t.ID)
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "\tTitle served\tStale in the audit\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\t%d of %d sampled\t\n", r.when, r.title, r.stale, r.sampled)
	}
	w.Flush()
	fmt.Fprintf(d.out, "\nThe write recorded its invalidations in its own transaction (the outbox). Its writer\n"+
		"died before applying them, so the old title stayed cached; the relay applied them\n"+
		"once they were %v old, and the audit found nothing stale after it.\n", outboxGrace)
	return nil
}

// part46 writes to the database from outside the app, with plain SQL (as
// psql, a migration or another service would), and times how long until
// the app serves the new value: the change data capture listener (cdc.go)
// invalidated it. It needs PostgreSQL with wal_level=logical.
func (d *demo) part46(ctx context.Context) error {
	if d.app.cdc == nil {
		fmt.Fprintf(d.out, "\nPart 4.6 (change data capture): not run: it needs PostgreSQL with wal_level=logical\n"+
			"(DATABASE_URL=postgres://…). Here only the app's own writes invalidate the cache.\n")
		return nil
	}
	svc := d.app.svc
	d.at("find a task of org acme")
	tasks, err := d.orgTasks(ctx, "acme", 1)
	if err != nil {
		return err
	}
	id := tasks[0].ID
	if _, err := svc.GetTask(ctx, id); err != nil {
		return err
	}
	title := fmt.Sprintf("Written with plain SQL at %s", time.Now().Format("15:04:05.000"))
	d.at("UPDATE the task with plain SQL, not through the app")
	if _, err := d.app.store.db.ExecContext(ctx, `UPDATE tasks SET title = $1 WHERE id = $2`, title, id); err != nil {
		return err
	}
	committed := time.Now()
	d.at("read the task until the new title is served")
	for {
		got, err := svc.GetTask(ctx, id)
		if err != nil {
			return err
		}
		if got.Title == title {
			break
		}
		if time.Since(committed) > 30*time.Second {
			return fmt.Errorf("the change stream did not invalidate task %d within 30s", id)
		}
		time.Sleep(time.Millisecond)
	}
	took := time.Since(committed)
	d.at("audit the task cache")
	rep, err := svc.Audit(ctx, "task", 20)
	if err != nil {
		return err
	}
	fmt.Fprintf(d.out, "\nPart 4.6 (change data capture): task %d updated with plain SQL, outside the app\n\n"+
		"The app served the new title %v after the commit: the listener read the change from\n"+
		"PostgreSQL's log and invalidated the task and its org's lists. Audit: %d stale of %d sampled.\n",
		id, took.Round(time.Millisecond), rep.Stale, rep.Sampled)
	return nil
}

// keepTargets saves the store's outbox targets, which a service built for
// one part (NewService) replaces with its own keys, and returns what puts
// the app's back.
func (d *demo) keepTargets() func() {
	saved := d.app.store.targets
	return func() { d.app.store.targets = saved }
}

// part47 is lecture 4.4's trade-off once invalidation is durable: the same
// reads and writes against a task cache whose TTL is 1s (the TTL bounds
// staleness) and one whose TTL is 1h (the writes' invalidations, in the
// outbox, do). The longer TTL keeps what a short one would reload, and the
// audit finds nothing stale in either.
func (d *demo) part47(ctx context.Context) error {
	const org, hot, readers = "acme", 50, 4
	run := 3 * time.Second
	tasks, err := d.orgTasks(ctx, org, hot)
	if err != nil {
		return err
	}
	ids := make([]int64, len(tasks))
	for i, t := range tasks {
		ids[i] = t.ID
	}
	defer d.keepTargets()()
	type row struct {
		ttl                 time.Duration
		gets, writes, loads uint64
		hitRate             float64
		stale, sampled      int
	}
	var rows []row
	for i, ttl := range []time.Duration{time.Second, time.Hour} {
		d.at(fmt.Sprintf("build a task cache with TTL %v", ttl))
		ttls, err := defaultTTLs.WithOverrides("task=" + ttl.String())
		if err != nil {
			return err
		}
		// A prefix of this run's own: a Redis kept from an earlier run (REDIS_URL)
		// still holds that run's tasks for an hour, and this run's database
		// is new.
		prefix := fmt.Sprintf("demo47.%d.%d.", time.Now().UnixNano(), i)
		svc, err := NewService(d.app.store, d.app.rdb, ttls, slog.New(slog.DiscardHandler), prefix, 0)
		if err != nil {
			return err
		}
		d.app.mon.add(fmt.Sprintf("task (part 4.7, TTL %v)", ttl), svc.tasks, false)
		d.at(fmt.Sprintf("read %d tasks from %d readers and update one every 100ms for %v, TTL %v", len(ids), readers, run, ttl))
		var gets, writes atomic.Uint64
		var wg sync.WaitGroup
		var firstErr atomic.Pointer[error]
		stop := time.Now().Add(run)
		for r := range readers {
			wg.Go(func() {
				for n := r; time.Now().Before(stop); n += readers {
					if _, err := svc.GetTask(ctx, ids[n%len(ids)]); err != nil {
						firstErr.CompareAndSwap(nil, &err)
						return
					}
					gets.Add(1)
					time.Sleep(time.Millisecond)
				}
			})
		}
		wg.Go(func() {
			for n := 0; time.Now().Before(stop); n++ {
				t := tasks[(n*7)%len(tasks)]
				in := TaskInput{Title: fmt.Sprintf("%s (edit %d)", strings.SplitN(t.Title, " (edit", 2)[0], n), Status: t.Status, Assignee: t.Assignee, Tags: t.Tags}
				if _, _, err := svc.UpdateTask(ctx, t.ID, in); err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
				writes.Add(1)
				time.Sleep(100 * time.Millisecond)
			}
		})
		wg.Wait()
		if p := firstErr.Load(); p != nil {
			svc.Close()
			return *p
		}
		s := svc.tasks.Stats()
		d.at(fmt.Sprintf("audit the task cache with TTL %v", ttl))
		rep, err := svc.Audit(ctx, "task", hot)
		if err == nil { // leave no hour-long entries behind
			_, err = svc.tasks.InvalidatePrefix(ctx, svc.taskKeys.Prefix())
		}
		svc.Close()
		if err != nil {
			return err
		}
		rows = append(rows, row{ttl, gets.Load(), writes.Load(), s.Loads, s.HitRate(), rep.Stale, rep.Sampled})
	}
	fmt.Fprintf(d.out, "\nPart 4.7 (lecture 4.4, once invalidation is durable): %d readers over %d tasks, a write every 100ms, %v per TTL\n\n", readers, len(ids), run)
	w := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "Task TTL\tGets\tWrites\tDB loads\tHit rate\tStale in the audit\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%v\t%d\t%d\t%d\t%.1f%%\t%d of %d sampled\t\n", r.ttl, r.gets, r.writes, r.loads, 100*r.hitRate, r.stale, r.sampled)
	}
	w.Flush()
	fmt.Fprintf(d.out, "\nEvery write invalidates its task through the outbox, so the TTL no longer bounds how\n"+
		"stale a task can be; it only bounds how often an unchanged task is reloaded. The app's\n"+
		"own table keeps 5 minutes: a write from outside the app needs change data capture\n"+
		"(part 4.6) before a longer TTL is safe for it too.\n")
	return nil
}

// orgTasks returns up to n tasks of org, the first page of its list; an org
// without tasks is an error.
func (d *demo) orgTasks(ctx context.Context, org string, n int) ([]Task, error) {
	page, err := d.app.svc.ListTasks(ctx, org, 0, "", 1, n)
	if err != nil {
		return nil, err
	}
	if len(page.Tasks) == 0 {
		return nil, fmt.Errorf("org %s has no tasks", org)
	}
	return page.Tasks, nil
}
