// Options: the settings of a Cache and their groups (Degradation; Policy is
// in ttl.go, LocalOptions in local.go), their defaults and validation.

package cacheaside

import (
	"context"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis is the part of a go-redis v9 client that a Cache uses. It is built
// from go-redis's own method sets, so *redis.Client (including the failover
// client of redis.NewFailoverClient), *redis.ClusterClient, *redis.Ring and
// any wrapper with the same methods satisfy it.
type Redis interface {
	redis.Scripter
	Get(ctx context.Context, key string) *redis.StringCmd
	MGet(ctx context.Context, keys ...string) *redis.SliceCmd
	Set(ctx context.Context, key string, value any, expiration time.Duration) *redis.StatusCmd
	Unlink(ctx context.Context, keys ...string) *redis.IntCmd
	Scan(ctx context.Context, cursor uint64, match string, count int64) *redis.ScanCmd
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// Options configures a Cache. A nil *Options and the zero value of every
// field mean the default written beside it.
type Options[T any] struct {
	// Name labels this cache in Stats, the Recorder, logs and errors.
	// Default "default".
	Name string

	// Policy sets the value TTL, the negative TTL, jitter, early refresh
	// and the stale windows. The zero Policy means its documented defaults
	// (TTL 5m, negative 60s, jitter 10%, XFetch beta 1, no stale serving).
	Policy Policy

	// Lifetime, when set, gives each entry its own lifetime: it is called
	// with a loaded value (notFound false) or a "not found" (notFound true,
	// v the zero value), and how long the load took (0 for Set), and
	// returns how long the entry stays fresh: a session that carries its
	// own expiry, a price valid until a timestamp, a report that is cheap
	// to reload kept shorter than a slow one. The Policy bounds it: a
	// result above Policy.TTL (Policy.NegativeTTL for "not found"), or of 0
	// or less, is that bound, so the Policy's TTL stays the longest any
	// entry lives (namespaces, the retry queue and the audit rely on it).
	// The Policy's jitter applies to the result, and the stale windows
	// follow it. It is called for Get, GetMany, refreshes and Set, on the
	// goroutine that fills; a panic in it fails that load's callers with a
	// *PanicError, like a panicking codec.
	Lifetime func(v T, notFound bool, took time.Duration) time.Duration

	// Namespaced makes every key of this cache belong to a Namespace:
	// keys must be built with Namespace.Key, Get reads the entry and the
	// namespace's generation with one MGET, and InvalidateNamespace drops
	// the whole namespace with one command. Default false.
	Namespaced bool

	// Tags, when set, gives the tags of the entry under key: the groups it
	// belongs to, such as a task-list page's org and assignee, each a
	// non-empty string of at most MaxKeySize bytes, at most 16 per key.
	// InvalidateTags then invalidates every entry carrying a tag with one
	// write, whatever their number. It must be a pure function of the key,
	// the same in every process that shares the cache's Name: a Get reads
	// the entry and its tags' generations in one round trip, and an entry
	// whose tags' generations moved since its load is a miss (see tags.go).
	// It is called on every Get, GetMany, Set, SetMany and Peek of a key,
	// on the caller's goroutine; an invalid tag fails the call with
	// ErrInvalidKey, and a panic fails it with a *PanicError. Not with
	// Namespaced. Default nil: no tags.
	Tags func(key string) []string

	// Clearable lets Clear invalidate every entry of the cache with one
	// write: every entry carries the cache's Clear generation as one more
	// tag, read beside it on every Redis-tier hit. Not with Namespaced.
	// Default false.
	Clearable bool

	// Local turns on the in-process tier in front of Redis: decoded values
	// served from memory for up to Local.TTL, kept coherent across
	// processes by an invalidation bus on Redis pub/sub (see LocalOptions).
	// The client must also implement pubsubClient. Default nil: no local tier.
	Local *LocalOptions

	// NoReadCoalescing sends every Get's read as its own command. By
	// default, when two reads are already on the wire, further Gets queue
	// their reads and all that are queued go out as one MGET (up to four
	// MGETs at a time; see coalesce.go), which raises throughput under
	// concurrency. A queued read waits at most twice OpTimeout. On Redis
	// Cluster and Ring the queued reads go out as one pipeline of GETs
	// (one round trip per node) instead of an MGET. Default false.
	NoReadCoalescing bool

	// Codec encodes values. Default JSON[T]().
	Codec Codec[T]

	// IsNotFound reports whether a loader error means "does not exist", in
	// addition to errors.Is(err, ErrNotFound); for example
	//	func(err error) bool { return errors.Is(err, sql.ErrNoRows) }
	// Default nil: only ErrNotFound.
	IsNotFound func(error) bool

	// LoadTimeout bounds each loader call. The load runs on a context
	// detached from the caller that started it (its values are kept, its
	// cancellation is not), so one caller giving up does not fail the others
	// sharing the load. Default 5s.
	LoadTimeout time.Duration

	// SoftLoadTimeout, when set, answers a Get with the old value once
	// the reload it waits for (its own, another Get's in this process, or
	// another process's) has kept it this long since the read that found
	// the value past its TTL, if the value is inside its
	// Policy.StaleIfError window: the reload goes on in the background,
	// under the same lease, and fills the entry when it returns (within
	// LoadTimeout, which stays the bound when nothing old is at hand).
	// Stats.SoftTimeouts counts these answers. Default 0 (off); it must be
	// below LoadTimeout.
	SoftLoadTimeout time.Duration

	// LeaseTTL is the lifetime of a lease in Redis: how long other callers
	// wait before taking over from a holder that died. A live holder renews
	// its lease every LeaseTTL/3 until its load returns, so loads may run
	// longer than LeaseTTL. Default 900ms; at least 10ms.
	LeaseTTL time.Duration

	// PollMin and PollMax bound the jittered exponential backoff with which
	// a Get polls for another holder's fill when the wake channel is not
	// live (a client without pub/sub, a Ring, a lost subscription): the
	// first check comes after about PollMin, each later one after twice the
	// previous delay, capped at PollMax. While the wake channel is live, the
	// fill's message wakes the Get and it polls only every 4 × PollMax
	// (jittered) as the fallback (see wait.go). Defaults 2ms and 25ms.
	PollMin time.Duration
	PollMax time.Duration

	// MaxValueSize is the largest encoded value, in bytes, that is cached.
	// A larger value is returned to the caller but not cached (counted in
	// Stats.NotCached and reported as ErrValueTooLarge). Default 1 MiB.
	MaxValueSize int

	// MaxKeySize is the longest key, in bytes, that Get, Set and Invalidate
	// accept; longer or empty keys give ErrInvalidKey. Default 1024.
	MaxKeySize int

	// Logger receives configuration warnings, state changes (Redis down and
	// recovered, the invalidation bus lost and back) and suppressed errors,
	// bounded: the first of each kind per 10s at Warn, then a summary line
	// with counts (see logs.go). Default: nil, which discards everything
	// except the configuration warnings New logs (a client setting that
	// breaks the cache's time bounds, say): those go to slog.Default(), so
	// a misconfiguration is visible without configuring anything. Set
	// Logger to slog.New(slog.DiscardHandler) to silence them too.
	Logger *slog.Logger

	// Recorder is told of every event as it happens (see Event), for
	// metrics that want events rather than totals. Default nil: none.
	// Cache.Stats works regardless; the cacheprometheus module exports
	// Stats without a Recorder.
	Recorder Recorder

	// Tracer follows each Get, GetMany and loader call with the caller's
	// context (see Tracer; the cacheotel module makes OpenTelemetry spans
	// with it). Default nil: no tracing, and no cost.
	Tracer Tracer

	// OnError is called with every error the cache suppresses or returns
	// from Redis or the codec; err is an *OpError. Default nil.
	OnError func(ctx context.Context, err error)

	// Degradation says how the cache behaves when Redis is slow or down:
	// the per-command budget, the circuit breaker, fail-open or
	// fail-closed, the cap on loads that bypass Redis, and retries of
	// failed invalidations. The zero value means its documented defaults.
	Degradation Degradation

	// Clock tells the time for freshness decisions (soft expiry, stale
	// windows, early refresh and the load durations it weighs) and for
	// Stats.LoadTime; leases and TTLs use Redis's own clock, and waits and
	// timeouts real time. Default time.Now.
	Clock func() time.Time
}

// Defaults of Options, named after the fields they fill in.
const (
	defaultName         = wire.DefaultName
	defaultLoadTimeout  = 5 * time.Second
	defaultLeaseTTL     = 900 * time.Millisecond
	defaultPollMin      = 2 * time.Millisecond
	defaultPollMax      = 25 * time.Millisecond
	defaultMaxValueSize = wire.DefaultMaxValueSize
	defaultMaxKeySize   = 1024
	minLeaseTTL         = 10 * time.Millisecond
)

// resolve validates o and returns a copy with every default filled in.
func (o *Options[T]) resolve() (Options[T], error) {
	var r Options[T]
	if o != nil {
		r = *o
	}
	invalid := func(format string, args ...any) (Options[T], error) {
		return Options[T]{}, fmt.Errorf("%w: %s", ErrInvalidOptions, fmt.Sprintf(format, args...))
	}
	if err := r.Policy.validate(); err != nil {
		return Options[T]{}, err
	}
	switch {
	case r.LoadTimeout < 0:
		return invalid("LoadTimeout %v is negative", r.LoadTimeout)
	case r.SoftLoadTimeout < 0:
		return invalid("SoftLoadTimeout %v is negative", r.SoftLoadTimeout)
	case r.LeaseTTL < 0:
		return invalid("LeaseTTL %v is negative", r.LeaseTTL)
	case r.LeaseTTL != 0 && r.LeaseTTL < minLeaseTTL:
		return invalid("LeaseTTL %v is below %v", r.LeaseTTL, minLeaseTTL)
	case r.PollMin < 0:
		return invalid("PollMin %v is negative", r.PollMin)
	case r.PollMax < 0:
		return invalid("PollMax %v is negative", r.PollMax)
	case r.MaxValueSize < 0:
		return invalid("MaxValueSize %d is negative", r.MaxValueSize)
	case r.MaxKeySize < 0:
		return invalid("MaxKeySize %d is negative", r.MaxKeySize)
	case len(r.Name) > 128:
		return invalid("Name is %d bytes, at most 128", len(r.Name))
	case r.Namespaced && r.Tags != nil:
		return invalid("Namespaced and Tags together: a namespace is the tag of a cache whose tags share its entries' slots; give keys their namespace as a tag instead")
	case r.Namespaced && r.Clearable:
		return invalid("Namespaced and Clearable together: a namespaced cache is cleared by invalidating its namespaces")
	}
	var err error
	if r.Degradation, err = r.Degradation.resolve(); err != nil {
		return Options[T]{}, err
	}
	if r.Name == "" {
		r.Name = defaultName
	}
	r.Policy = r.Policy.resolved()
	if r.Codec == nil {
		r.Codec = JSON[T]()
	}
	if r.LoadTimeout == 0 {
		r.LoadTimeout = defaultLoadTimeout
	}
	if r.SoftLoadTimeout >= r.LoadTimeout {
		return invalid("SoftLoadTimeout %v is not below LoadTimeout %v", r.SoftLoadTimeout, r.LoadTimeout)
	}
	if r.LeaseTTL == 0 {
		r.LeaseTTL = defaultLeaseTTL
	}
	if r.PollMin == 0 {
		r.PollMin = defaultPollMin
	}
	if r.PollMax == 0 {
		r.PollMax = max(defaultPollMax, r.PollMin)
	}
	if r.PollMax < r.PollMin {
		return invalid("PollMax %v is below PollMin %v", r.PollMax, r.PollMin)
	}
	if r.MaxValueSize == 0 {
		r.MaxValueSize = defaultMaxValueSize
	}
	if r.MaxKeySize == 0 {
		r.MaxKeySize = defaultMaxKeySize
	}
	if r.Logger == nil {
		r.Logger = slog.New(slog.DiscardHandler)
	}
	if r.Clock == nil {
		r.Clock = time.Now
	}
	return r, nil
}

// Degradation configures how a Cache behaves when Redis is slow or down
// (Options.Degradation). The zero value of each field means the default
// written beside it.
type Degradation struct {
	// RedisTimePerGet bounds the time one Get or GetMany spends on Redis
	// in all: its read, its lease rounds, its polls while another holder
	// loads, and its fill (not the loader's time, nor the pauses between
	// polls). Each command gets the smaller of OpTimeout and what is left;
	// once it is spent, the Get goes on without Redis, as if Redis were
	// down (the loader answers, uncached; FailClosed: ErrRedisUnavailable).
	// So a Redis that answers every command just under OpTimeout cannot
	// stack command after command on a miss. The worst case of a Get:
	//
	//	RedisTimePerGet + LoadTimeout (its load, or the one it shares)
	//	  + LoadTimeout + LeaseTTL while another process holds the lease
	//	  + LoadTimeout for a load slot while Redis is down and
	//	    MaxLoadsWhileDown loads run
	//
	// each of the last two terms only in that case. Default 4 × OpTimeout
	// (200ms), or MaxOpTimeout if that is longer; at least OpTimeout.
	RedisTimePerGet time.Duration

	// OpTimeout is the budget of a Redis read (GET, MGET, a lease round, a
	// PUBLISH), and the least it adapts to: a read's budget is 4 × the
	// 99th percentile of recent answered reads, between OpTimeout and
	// MaxOpTimeout (adapt.go). A command never gets more than half of
	// what remains of the caller's deadline. An unreachable Redis (no
	// answers) costs a Get at most the budget (per command) before it
	// falls back. The SCANs of InvalidatePrefix get ten times OpTimeout, at
	// least 1s; writes that must not be lost get WriteTimeout. Default
	// 50ms; at least 1ms.
	OpTimeout time.Duration

	// MaxOpTimeout is the most a read's budget grows to while Redis
	// answers slowly, so a slow Redis stays in use instead of sending
	// every read to the database. It grows only on answers: a Redis that
	// answers nothing leaves the budget where it was. Set it to OpTimeout
	// for a fixed budget. Default 4 × OpTimeout (200ms); at least
	// OpTimeout.
	MaxOpTimeout time.Duration

	// BreakerFailures is how many consecutive Redis failures (transport
	// errors, timeouts, LOADING-style replies; not misses, not the caller's
	// own cancellation) open the circuit breaker. While it is open, Redis is
	// skipped entirely. Default 5.
	BreakerFailures int

	// BreakerCooldown is how long the breaker stays open before one probe
	// command is let through (half-open); success closes it. Default 1s.
	BreakerCooldown time.Duration

	// NoBreaker turns the circuit breaker off. Default false.
	NoBreaker bool

	// OnRedisDown says what Get does when Redis cannot be used: FailOpen
	// (call the loader; default) or FailClosed (return ErrRedisUnavailable).
	OnRedisDown RedisDownPolicy

	// MaxLoadsWhileDown caps the loads running at once, in this cache, that
	// bypass Redis because it failed, so a Redis outage cannot flood the
	// source. Past the cap the shared load waits up to LoadTimeout for a
	// slot (each caller still returns when its own context ends), or, with
	// FailFastWhenCapped, the Get returns ErrOverloaded at once. Default 64.
	MaxLoadsWhileDown int

	// FailFastWhenCapped: see MaxLoadsWhileDown. Default false.
	FailFastWhenCapped bool

	// WriteTimeout bounds each Redis write whose loss would leave a stale
	// entry behind or other processes waiting: Invalidate (one key or a
	// batch alike), each UNLINK batch of InvalidatePrefix,
	// InvalidateNamespace, Set, and a lease holder's fill and release. Default
	// 5 × OpTimeout (250ms), plus as much again per 1,000 keys of a batch.
	WriteTimeout time.Duration

	// RetryInvalidations is how long an invalidation that failed
	// (Invalidate, InvalidatePrefix, InvalidateNamespace, a failed Set) is
	// retried in the background; while it waits, this process's Gets of
	// the keys it covers load from the source instead of the cache (see
	// retry.go). The call still returns its error. At most 10,000 are kept;
	// more are dropped and counted. Default: the longest lifetime the cache
	// gives an entry (the policy's TTL plus its stale windows, or its
	// NegativeTTL, plus LeaseTTL), after which the stale entry is gone anyway.
	RetryInvalidations time.Duration

	// NoRetryInvalidations turns the retries (and the bypass of pending
	// keys) off: a failed invalidation's entries then live until their TTL
	// ends, in this process too. Default false.
	NoRetryInvalidations bool
}

// Defaults of Degradation, named after the fields they fill in.
const (
	defaultOpTimeout         = 50 * time.Millisecond
	defaultBreakerFailures   = 5
	defaultBreakerCooldown   = time.Second
	defaultMaxLoadsWhileDown = 64
)

// resolve validates d and returns it with every default filled in.
func (d Degradation) resolve() (Degradation, error) {
	invalid := func(format string, args ...any) (Degradation, error) {
		return Degradation{}, fmt.Errorf("%w: Degradation.%s", ErrInvalidOptions, fmt.Sprintf(format, args...))
	}
	switch {
	case d.OpTimeout < 0:
		return invalid("OpTimeout %v is negative", d.OpTimeout)
	case d.OpTimeout != 0 && d.OpTimeout < time.Millisecond:
		return invalid("OpTimeout %v is below 1ms", d.OpTimeout)
	case d.BreakerFailures < 0:
		return invalid("BreakerFailures %d is negative", d.BreakerFailures)
	case d.BreakerCooldown < 0:
		return invalid("BreakerCooldown %v is negative", d.BreakerCooldown)
	case d.OnRedisDown != FailOpen && d.OnRedisDown != FailClosed:
		return invalid("OnRedisDown %v is not FailOpen or FailClosed", d.OnRedisDown)
	case d.MaxLoadsWhileDown < 0:
		return invalid("MaxLoadsWhileDown %d is negative", d.MaxLoadsWhileDown)
	case d.RetryInvalidations < 0:
		return invalid("RetryInvalidations %v is negative", d.RetryInvalidations)
	case d.RedisTimePerGet < 0:
		return invalid("RedisTimePerGet %v is negative", d.RedisTimePerGet)
	case d.WriteTimeout < 0:
		return invalid("WriteTimeout %v is negative", d.WriteTimeout)
	case d.WriteTimeout != 0 && d.WriteTimeout < time.Millisecond:
		return invalid("WriteTimeout %v is below 1ms", d.WriteTimeout)
	case d.MaxOpTimeout < 0:
		return invalid("MaxOpTimeout %v is negative", d.MaxOpTimeout)
	}
	if d.OpTimeout == 0 {
		d.OpTimeout = defaultOpTimeout
	}
	if d.BreakerFailures == 0 {
		d.BreakerFailures = defaultBreakerFailures
	}
	if d.BreakerCooldown == 0 {
		d.BreakerCooldown = defaultBreakerCooldown
	}
	if d.MaxLoadsWhileDown == 0 {
		d.MaxLoadsWhileDown = defaultMaxLoadsWhileDown
	}
	if d.WriteTimeout == 0 {
		d.WriteTimeout = 5 * d.OpTimeout
	}
	if d.MaxOpTimeout == 0 {
		d.MaxOpTimeout = 4 * d.OpTimeout
	}
	if d.MaxOpTimeout < d.OpTimeout {
		return invalid("MaxOpTimeout %v is below OpTimeout %v", d.MaxOpTimeout, d.OpTimeout)
	}
	if d.RedisTimePerGet == 0 {
		d.RedisTimePerGet = max(4*d.OpTimeout, d.MaxOpTimeout)
	}
	if d.RedisTimePerGet < d.OpTimeout {
		return invalid("RedisTimePerGet %v is below OpTimeout %v", d.RedisTimePerGet, d.OpTimeout)
	}
	return d, nil
}

// RedisDownPolicy says what Get does when Redis cannot be used.
type RedisDownPolicy int

const (
	// FailOpen calls the loader and returns its value, uncached. Default.
	FailOpen RedisDownPolicy = iota
	// FailClosed returns an error matching ErrRedisUnavailable, within the
	// operation budget, without calling the loader.
	FailClosed
)

func (p RedisDownPolicy) String() string {
	switch p {
	case FailOpen:
		return "fail-open"
	case FailClosed:
		return "fail-closed"
	}
	return fmt.Sprintf("RedisDownPolicy(%d)", int(p))
}
