// Package cacheaside puts Redis in front of slow data the cache-aside way,
// and handles what goes wrong around it: stampedes, lookups of things that
// do not exist, stale writes racing invalidation, and Redis failing.
//
// A Cache[T] wraps a go-redis v9 client. Get returns the cached value or
// calls your loader, stores its result, and shares one load among every
// caller that asks for the same key at the same time, in this process and
// across processes:
//
//	rdb := redis.NewClient(cacheaside.Recommended(&redis.Options{Addr: "localhost:6379"}))
//	tasks, err := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{
//		Name:   "task",
//		Policy: cacheaside.Policy{TTL: 5 * time.Minute, NegativeTTL: time.Minute},
//	})
//	keys := cacheaside.MustKeyspace("tasks", 1)
//
//	task, err := tasks.Get(ctx, keys.Key("42"), func(ctx context.Context) (Task, error) {
//		return repo.Get(ctx, 42) // return cacheaside.ErrNotFound when absent
//	})
//	// after the database write commits:
//	_, err = tasks.Invalidate(ctx, keys.Key("42"))
//
// # The entry protocol
//
// Each entry is one Redis string key holding a small header and the
// encoded value. While an entry is being loaded the key holds a lease
// instead: a random 128-bit token with a server-side expiry. The caller
// holding the lease loads and then fills the key with a Lua compare-and-set
// that succeeds only if the key still holds its token. Invalidate deletes
// the key, so a load that started before the invalidation can never write
// its older value afterwards. Everyone else waits for the fill, or takes
// over when the lease expires because its holder died.
//
// A hit is one GET; the scripts run only on misses. Get and GetMany follow
// the same protocol per key, so a batch and single Gets of one key share
// its load.
//
// # Observability
//
// Stats is a snapshot of counters, cheap enough to read at every scrape;
// the cacheprometheus and cacheotel modules (under extra/) export every
// counter Stats.Counters lists. A Recorder is told of each Event as it is
// counted; a Tracer sees each Get, GetMany and loader call with its
// context, for spans. Configuration warnings go to slog.Default() unless
// Options.Logger is set.
//
// # Failures
//
// Every Redis command runs under a small budget (Degradation.OpTimeout), and a
// circuit breaker skips Redis while it is failing. By default Get then
// calls the loader (at most Degradation.MaxLoadsWhileDown at a time) and
// reports the failure to Options.Logger, Options.Recorder and
// Options.OnError instead of returning it; with Degradation.OnRedisDown set to
// FailClosed it returns ErrRedisUnavailable. Degradation.RedisTimePerGet
// bounds the Redis time of a whole Get, so commands that each stay under
// the budget cannot stack. Set and the invalidations return their errors,
// and a failed invalidation is queued and retried; until it lands, this
// process's Gets of its keys load from the source, so a writer reads its
// own write. Waiters for another process's load are woken by its fill
// (a message on the cache's wake channel), with polling as the fallback. Loader errors and panics are never cached; a panic
// reaches every caller sharing the load as a *PanicError.
//
// Past its TTL a value can still be served while one caller refreshes it
// (Policy.StaleWhileRevalidate, Policy.StaleIfError), and XFetch refreshes
// hot values shortly before they expire. Namespaces invalidate whole
// groups of keys with one command; tags (Options.Tags, InvalidateTags)
// give an entry several such groups, across Cluster slots, and Clear
// (Options.Clearable) drops a whole cache the same way.
//
// # Scale
//
// GetMany reads a batch of ids with one MGET (one pipeline per node on
// Redis Cluster), loads every miss with one BatchLoader call, and shares
// per-key leases and in-process loads with Get. Options.Local adds an
// in-process tier of decoded values in front of Redis, kept coherent
// across processes by an invalidation bus on Redis pub/sub, with a
// staleness bound set by LocalOptions.TTL. Under concurrency, Gets' reads
// are coalesced into one MGET (Options.NoReadCoalescing turns that off).
//
// # Links
//
//   - The load path, step by step, with the Redis commands it sends: README.md
//   - How the code is laid out, and which file owns each rule:
//     docs/architecture.md
//   - Facebook's memcache leases, the idea behind the fill check:
//     https://www.usenix.org/conference/nsdi13/technical-sessions/presentation/nishtala
//   - go-redis: https://redis.uptrace.dev/
package cacheaside
