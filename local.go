// The local tier: decoded values in memory, kept coherent by an
// invalidation bus on Redis pub/sub.

package cacheaside

import (
	"context"
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"hash/maphash"
	"strings"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"github.com/redis/go-redis/v9"
)

// The local tier. With Options.Local set, a Cache keeps decoded values in
// process memory (a bounded github.com/maypok86/otter/v2 cache) in front of
// Redis, so a hot key is served without a round trip. What keeps the tiers
// of several processes coherent is an invalidation bus on Redis pub/sub:
//
//   - Invalidate, InvalidatePrefix, InvalidateNamespace and Set publish
//     what they invalidated on LocalOptions.Channel, after Redis has
//     applied it; every Cache subscribed to the channel drops the matching
//     local entries when the message arrives;
//   - a local entry lives at most LocalOptions.TTL, and never past the
//     soft expiry of the Redis entry it was read from, so a lost message
//     costs at most that;
//   - while the subscription is not confirmed (at start, after any error,
//     or when a health-check PING goes unanswered) the local tier is empty
//     and bypassed: Gets read Redis as without it;
//   - a value read from Redis (or loaded) is stored locally only if no
//     invalidation of its key arrived between the start of that read and
//     the store (epochs, below), so a message that overtakes a slow read
//     cannot be undone by it.
//
// Redis 6's server-assisted client-side caching, as go-redis implements
// it, was the other candidate. It works only on standalone clients with
// RESP3, caches reply bytes (so every hit still decodes the envelope and
// the value), and applies invalidations asynchronously, milliseconds
// later. The bus works on Cluster too, holds decoded values, and its
// staleness bound is an option; the README compares both.

// LocalOptions configures the local tier. The zero value of each field
// means the default written beside it.
type LocalOptions struct {
	// MaxEntries bounds the number of keys held in memory; the least
	// valuable are evicted (otter's S3-FIFO policy). Default 10,000.
	MaxEntries int

	// TTL is the longest a value is served from memory without reading
	// Redis again: the staleness bound when an invalidation message is
	// lost. A value is never served locally past its own TTL either.
	// Default 1s.
	TTL time.Duration

	// Channel is the pub/sub channel invalidations travel on. Every Cache
	// that shares keys with this one, in any process, must use the same
	// channel (and enable Local, even a Cache that only writes). Default
	// "cacheaside:invalidate:" + Options.Name.
	Channel string

	// HealthCheck is how long the subscription may stay silent before it
	// is probed with a PING; if the PONG does not come within another
	// HealthCheck, the local tier is flushed and bypassed until a new
	// subscription is confirmed. Default 1s.
	HealthCheck time.Duration
}

// Default values of LocalOptions.
const (
	defaultLocalMaxEntries    = 10_000
	defaultLocalTTL           = time.Second
	defaultLocalHealthCheck   = time.Second
	defaultLocalChannelPrefix = wire.BusChannelPrefix // + Options.Name
)

// pubsubClient is what the local tier needs from the Redis client besides Redis:
// pub/sub. *redis.Client (including failover clients) and
// *redis.ClusterClient have it. *redis.Ring is refused: it routes a
// channel to the shard its name hashes to among the live shards, so after
// a shard comes back, publishers and existing subscribers can sit on
// different shards without either side seeing an error.
type pubsubClient interface {
	Publish(ctx context.Context, channel string, message any) *redis.IntCmd
	Subscribe(ctx context.Context, channels ...string) *redis.PubSub
}

func (o *LocalOptions) resolve(name string) (LocalOptions, error) {
	r := *o
	switch {
	case r.MaxEntries < 0:
		return r, fmt.Errorf("%w: Local.MaxEntries %d is negative", ErrInvalidOptions, r.MaxEntries)
	case r.TTL < 0:
		return r, fmt.Errorf("%w: Local.TTL %v is negative", ErrInvalidOptions, r.TTL)
	case r.HealthCheck < 0:
		return r, fmt.Errorf("%w: Local.HealthCheck %v is negative", ErrInvalidOptions, r.HealthCheck)
	case r.TTL != 0 && r.TTL < time.Millisecond:
		return r, fmt.Errorf("%w: Local.TTL %v is below 1ms", ErrInvalidOptions, r.TTL)
	case r.HealthCheck != 0 && r.HealthCheck < 10*time.Millisecond:
		return r, fmt.Errorf("%w: Local.HealthCheck %v is below 10ms", ErrInvalidOptions, r.HealthCheck)
	}
	if r.MaxEntries == 0 {
		r.MaxEntries = defaultLocalMaxEntries
	}
	if r.TTL == 0 {
		r.TTL = defaultLocalTTL
	}
	if r.HealthCheck == 0 {
		r.HealthCheck = defaultLocalHealthCheck
	}
	if r.Channel == "" {
		r.Channel = defaultLocalChannelPrefix + name
	}
	return r, nil
}

// localStripes is the number of per-key epoch counters.
const localStripes = 256

// tagStripe is the namespace stripe of the items of a tagged cache: they
// check localTier.tags.
const tagStripe = localStripes

// localTier is the in-memory tier of one Cache.
type localTier[T any] struct {
	opts LocalOptions
	m    *otter.Cache[string, *localItem[T]]
	seed maphash.Seed

	live atomic.Bool // the subscription is confirmed: the tier may be used
	lost atomic.Bool // a loss was logged: log the return

	// refused holds the server's refusal of SUBSCRIBE (see refusesPubSub)
	// until a subscription is confirmed; nil otherwise.
	refused atomic.Pointer[error]
	// refusedSubscribe and refusedPublish: each refusal was logged (once
	// per Cache).
	refusedSubscribe, refusedPublish atomic.Bool

	// Epochs. A store records the epochs before its read and is undone if
	// they moved: global moves on every flush and prefix invalidation,
	// stripe[i] on every key invalidation of a key in stripe i.
	global atomic.Uint64
	stripe [localStripes]atomic.Uint64
	// ns[i] moves on every bump of a namespace whose generation key hashes
	// to i. An item remembers its namespace's epoch from before its read,
	// and lookup refuses it once that epoch moved, so a bump costs O(1)
	// instead of a walk over the tier.
	ns [localStripes]atomic.Uint64
	// tags moves on every tag invalidation and Clear: the items of a
	// tagged cache (stripe tagStripe) remember it from before their read,
	// and are refused once it moved, whichever tags they carry.
	tags atomic.Uint64

	ev *events // counts flushes and bus messages

	now    func() int64       // Unix ns that local expiry is checked against
	coarse *otter.CoarseClock // behind now, unless Options.Clock is set; Close stops it
}

// localItem is one value (or "not found") held locally.
type localItem[T any] struct {
	v        T
	notFound bool
	exp      int64  // Unix nanoseconds, by Options.Clock
	nsi      int32  // its namespace's stripe in localTier.ns, or -1
	ns       uint64 // that stripe's epoch before the read
}

// localSnap is the epochs a read started under.
type localSnap struct {
	g, s uint64
	i    uint32
	nsi  int32 // -1 outside namespaces
	ns   uint64
}

// newLocalTier builds the tier. With clock nil (Options.Clock not set),
// local expiry reads otter's coarse clock, which costs a load instead of a
// system clock read on every local hit: it ticks every TTL/100 (at least
// 100µs, at most 10ms), so a local copy may be served up to that much past
// its expiry.
func newLocalTier[T any](o LocalOptions, ev *events, clock func() time.Time) (*localTier[T], error) {
	m, err := otter.New(&otter.Options[string, *localItem[T]]{MaximumSize: o.MaxEntries})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOptions, err)
	}
	l := &localTier[T]{opts: o, m: m, seed: maphash.MakeSeed(), ev: ev}
	if clock != nil {
		l.now = func() int64 { return clock().UnixNano() }
	} else {
		l.coarse = otter.NewCoarseClock(coarseResolution(o.TTL))
		l.now = l.coarse.NowNano
	}
	return l, nil
}

// coarseResolution is the tick of the local tier's clock for a tier of
// the given TTL.
func coarseResolution(ttl time.Duration) time.Duration {
	return min(max(ttl/100, 100*time.Microsecond), 10*time.Millisecond)
}

// close stops the tier's clock.
func (l *localTier[T]) close() {
	if l.coarse != nil {
		l.coarse.Stop()
	}
}

// lookup returns key's local item if the tier is live and the item has
// not expired at now.
func (l *localTier[T]) lookup(key string, now int64) (*localItem[T], bool) {
	if !l.live.Load() {
		return nil, false
	}
	it, ok := l.m.GetIfPresent(key)
	if !ok || now >= it.exp || it.nsi >= 0 && l.epoch(it.nsi) != it.ns {
		return nil, false
	}
	return it, true
}

// snap records the epochs for key (whose version keys are vk: of its
// namespace, or its tags) before a read whose result may be stored.
func (l *localTier[T]) snap(key string, vk verKeys) localSnap {
	i := uint32(maphash.String(l.seed, key) % localStripes)
	sn := localSnap{g: l.global.Load(), s: l.stripe[i].Load(), i: i, nsi: -1}
	switch {
	case vk.ns != "":
		sn.nsi = int32(maphash.String(l.seed, vk.ns) % localStripes)
		sn.ns = l.ns[sn.nsi].Load()
	case len(vk.tags) > 0:
		sn.nsi = tagStripe
		sn.ns = l.tags.Load()
	}
	return sn
}

// epoch is the epoch an item of stripe nsi (or of tagStripe) checks.
func (l *localTier[T]) epoch(nsi int32) uint64 {
	if nsi == tagStripe {
		return l.tags.Load()
	}
	return l.ns[nsi].Load()
}

// put stores it under key unless an invalidation that may cover key came
// after s was taken. The check follows the store, and invalidations move
// the epoch before they delete, so either the check sees the move and the
// store is undone, or the deletion comes after the store and removes it.
func (l *localTier[T]) put(key string, it *localItem[T], s localSnap) {
	if !l.live.Load() {
		return
	}
	it.nsi, it.ns = s.nsi, s.ns
	l.m.Set(key, it)
	if l.global.Load() != s.g || l.stripe[s.i].Load() != s.s {
		l.m.ComputeIfPresent(key, func(old *localItem[T]) (*localItem[T], otter.ComputeOp) {
			if old == it {
				return nil, otter.InvalidateOp
			}
			return old, otter.CancelOp
		})
	}
}

// expiry is when a local copy of an entry whose soft expiry (Unix ms) is
// soft, stored at now (Unix ns), stops being served.
func (l *localTier[T]) expiry(now int64, soft int64) int64 {
	exp := now + int64(l.opts.TTL)
	if soft > 0 {
		exp = min(exp, soft*int64(time.Millisecond))
	}
	return exp
}

func (l *localTier[T]) dropKeys(keys []string) {
	for _, k := range keys {
		l.stripe[maphash.String(l.seed, k)%localStripes].Add(1)
		l.m.Invalidate(k)
	}
}

func (l *localTier[T]) dropPrefix(prefix string) {
	l.global.Add(1)
	for k := range l.m.Keys() {
		if strings.HasPrefix(k, prefix) {
			l.m.Invalidate(k)
		}
	}
}

// bump invalidates every local item of the namespace whose generation
// key is genKey (and, rarely, of namespaces sharing its stripe), and every
// item of a tagged cache (genKey is then a tag's or Clear's generation
// key: a tier does not know which items carry which tag).
func (l *localTier[T]) bump(genKey string) {
	l.ns[maphash.String(l.seed, genKey)%localStripes].Add(1)
	l.tags.Add(1)
}

func (l *localTier[T]) flush() {
	l.global.Add(1)
	l.ev.localFlushed()
	l.m.InvalidateAll()
}

// keepLocal stores what a read found (a fresh value or a tombstone) in the
// local tier, if there is one.
func (c *Cache[T]) keepLocal(key string, vw *view[T], now time.Time, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: vw.v, notFound: vw.state == stNotFound, exp: c.local.expiry(now.UnixNano(), vw.e.SoftExpiry)}, snap)
}

// dropLocal removes key from the local tier, if there is one.
func (c *Cache[T]) dropLocal(key string) {
	if c.local != nil {
		c.local.dropKeys([]string{key})
	}
}

// putLocal stores a value (or "not found") this process just filled.
func (c *Cache[T]) putLocal(key string, v T, notFound bool, soft int64, snap localSnap) {
	if c.local == nil {
		return
	}
	c.local.put(key, &localItem[T]{v: v, notFound: notFound, exp: c.local.expiry(c.opts.Clock().UnixNano(), soft)}, snap)
}
