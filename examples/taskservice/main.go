// Command taskservice is the cacheaside reference app: a task-manager API
// whose every endpoint shows one caching pattern of the lecture, and a demo
// that reproduces the lecture's numbers.
//
//	taskservice            serve the API on :8080 (ADDR to change)
//	taskservice demo       run the lecture's before/after demos and print the numbers
//
// Storage: PostgreSQL at DATABASE_URL, else an SQLite file in a temporary
// directory. Redis: REDIS_URL, else an embedded in-memory Redis
// (miniredis). TTLs: the table in service.go, overridden by CACHE_TTLS
// (for example "task=2m,task_list=30s").
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheprometheus"
)

// redisLog routes go-redis's own log lines (connection pool retries) to
// slog at debug level: the cache already reports every Redis failure once.
type redisLog struct{ log *slog.Logger }

func (l redisLog) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, fmt.Sprintf(format, v...), "source", "go-redis")
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	redis.SetLogger(redisLog{log})
	args := os.Args[1:]
	var err error
	if len(args) > 0 && args[0] == "demo" {
		err = runDemo(os.Stdout, args[1:])
	} else {
		err = serve(log, args)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "taskservice:", err)
		os.Exit(1)
	}
}

// env holds what the app reads from its environment.
type env struct {
	databaseURL string
	redisURL    string
	cacheTTLs   string
	addr        string
	adminToken  string // when set, /admin/* and /metrics require "Authorization: Bearer <it>"

	sample     time.Duration // the dashboard's sampling interval; 0 means 1s (tests set it shorter)
	auditEvery time.Duration // AUDIT_EVERY: a staleness audit of each cache this often; 0: only on request
	cdc        string        // CDC: "off" turns change data capture off (cdc.go)
}

func readEnv() env {
	e := env{
		databaseURL: os.Getenv("DATABASE_URL"),
		redisURL:    os.Getenv("REDIS_URL"),
		cacheTTLs:   os.Getenv("CACHE_TTLS"),
		addr:        os.Getenv("ADDR"),
		adminToken:  os.Getenv("ADMIN_TOKEN"),
		cdc:         cdcMode(os.Getenv("CDC")),
	}
	if s := os.Getenv("AUDIT_EVERY"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < time.Second {
			fmt.Fprintf(os.Stderr, "AUDIT_EVERY=%q: want a duration of 1s or more (e.g. 1m); audits run on request only\n", s)
		} else {
			e.auditEvery = d
		}
	}
	if e.addr == "" {
		e.addr = "127.0.0.1:8080"
	}
	return e
}

// app is everything a running service owns.
type app struct {
	api     *API
	svc     *Service
	store   *Store
	log     *slog.Logger
	mon     *monitor // the dashboard's samples of every cache
	rdb     *redis.Client
	mini    *miniredis.Miniredis // nil with REDIS_URL
	tmpDir  string               // SQLite's directory, removed on close
	prefix  string               // of every keyspace and bus channel
	Handler http.Handler

	stopAudits func() // ends the periodic audits (AUDIT_EVERY); nil without
	stopRelay  func() // ends the outbox's relay
	stopCDC    func() // ends the change data capture listener; nil without
	cdc        *cacheoutbox.Listener
}

// localTaskTTL is how long the task cache's local tier may serve a task
// from memory (the bound if an invalidation message is lost).
const localTaskTTL = time.Second

// newApp opens the database and Redis named by e and builds the service.
// dbLatency slows every query down (for demos); prefix isolates the app's
// keys (for tests that share a Redis).
func newApp(ctx context.Context, e env, log *slog.Logger, dbLatency time.Duration, prefix string) (*app, error) {
	a := &app{log: log}
	ok := false
	defer func() {
		if !ok {
			a.Close()
		}
	}()
	sqlitePath := ""
	if e.databaseURL == "" {
		dir, err := os.MkdirTemp("", "taskservice-")
		if err != nil {
			return nil, err
		}
		a.tmpDir = dir
		sqlitePath = filepath.Join(dir, "tasks.db")
	}
	store, err := OpenStore(ctx, e.databaseURL, sqlitePath)
	if err != nil {
		return nil, err
	}
	store.latency = dbLatency
	a.store = store

	var opt *redis.Options
	if e.redisURL != "" {
		if opt, err = redis.ParseURL(e.redisURL); err != nil {
			return nil, fmt.Errorf("REDIS_URL: %w", err)
		}
	} else {
		if a.mini, err = miniredis.Run(); err != nil {
			return nil, err
		}
		opt = &redis.Options{Addr: a.mini.Addr()}
	}
	// The library's recommended client settings (lecture 5.3: fail fast
	// when Redis is gone rather than holding requests); see
	// cacheaside.Recommended for each setting and why.
	a.rdb = redis.NewClient(cacheaside.Recommended(opt))

	ttls, err := defaultTTLs.WithOverrides(e.cacheTTLs)
	if err != nil {
		return nil, fmt.Errorf("CACHE_TTLS: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector())
	a.prefix = prefix
	if a.svc, err = NewService(store, a.rdb, ttls, log, prefix, localTaskTTL); err != nil {
		return nil, err
	}
	// 5.4: every cache's Stats, read at each scrape (no cost per request).
	reg.MustRegister(cacheprometheus.NewCollector("", a.svc.Caches()...))
	if e.sample <= 0 {
		e.sample = time.Second
	}
	a.mon = newMonitor(e.sample)
	a.mon.add("task", a.svc.tasks, a.svc.localTier)
	a.mon.add("task_list", a.svc.lists, false)
	a.mon.add("org_stats", a.svc.stats, false)
	// The outbox's relay: the invalidations a writer recorded with its
	// write but did not apply (Redis refused, or it died after the commit).
	rctx, stopRelay := context.WithCancel(context.Background())
	relayDone := make(chan struct{})
	go func() { defer close(relayDone); _ = store.outbox.Relay(rctx, a.svc.tasks, a.svc.lists) }()
	a.stopRelay = func() { stopRelay(); <-relayDone }
	if a.stopCDC, err = a.startCDC(ctx, e, reg); err != nil {
		return nil, err
	}
	audits := newAuditor(a.svc, reg)
	if e.auditEvery > 0 {
		actx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); audits.run(actx, e.auditEvery) }()
		a.stopAudits = func() { stop(); <-done }
	}
	a.api = &API{svc: a.svc, store: store, rdb: a.rdb, reg: reg, log: log, adminToken: e.adminToken, mon: a.mon, audits: audits}
	a.Handler = a.api.Routes()
	log.Info("taskservice ready", "database", store.dialect, "redis", redisLabel(e.redisURL), "ttls", describe(ttls))
	ok = true
	return a, nil
}

func redisLabel(url string) string {
	if url == "" {
		return "embedded (miniredis)"
	}
	return "REDIS_URL"
}

// Close releases everything, in the reverse order of newApp.
func (a *app) Close() {
	if a.stopAudits != nil {
		a.stopAudits()
	}
	if a.stopRelay != nil {
		a.stopRelay()
	}
	if a.stopCDC != nil {
		a.stopCDC()
	}
	if a.mon != nil {
		a.mon.close()
	}
	if a.svc != nil {
		if n := a.svc.drain(2 * time.Second); n > 0 && a.log != nil {
			a.log.Warn("shutting down with cache invalidations still queued; those entries live until their TTL", "pending", n)
		}
		a.svc.Close()
	}
	if a.rdb != nil {
		a.rdb.Close()
	}
	if a.mini != nil {
		a.mini.Close()
	}
	if a.store != nil {
		a.store.Close()
	}
	if a.tmpDir != "" {
		os.RemoveAll(a.tmpDir)
	}
}

func serve(log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("taskservice", flag.ContinueOnError)
	latency := fs.Duration("db-latency", 0, "extra time added to every database query")
	if err := fs.Parse(args); err != nil {
		return err
	}
	e := readEnv()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := newApp(ctx, e, log, *latency, "")
	if err != nil {
		return err
	}
	defer a.Close()
	if e.adminToken == "" && !loopback(e.addr) {
		log.Warn("ADMIN_TOKEN is not set and the app listens beyond loopback: /admin/* and /metrics answer clients on loopback only (403 for others); set ADMIN_TOKEN to reach them from elsewhere", "addr", e.addr)
	}
	srv := &http.Server{Addr: e.addr, Handler: a.Handler, ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout: 15 * time.Second, WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Info("listening", "addr", "http://"+e.addr, "try", "curl http://"+e.addr+"/tasks/42")
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// loopback reports whether addr (host:port) listens on loopback only.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
