package cacheaside

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// diffInternals is the only place this file touches unexported Cache
// internals; adapt it when they are restructured. It installs afterMiss as
// c's test hook and returns a function that reports whether c has no
// background refresh (stale-while-revalidate) and no in-process load
// running (a caller that gave up leaves its load running). The harness
// waits for that before Close, because Close cancels both; Close itself
// then waits for the background lease releases (releaseLater).
func diffInternals[T any](c *Cache[T], afterMiss func(key string)) (idle func() bool) {
	c.hooks = &testHooks{afterMiss: afterMiss}
	return func() bool {
		flying := false
		c.inflight.Range(func(any, any) bool { flying = true; return false })
		if flying {
			return false
		}
		return !c.refreshes.busy()
	}
}

// TestDifferentialGetVsGetMany runs seeded random schedules twice, on fresh
// copies of the same starting state: once through Get (one call per key,
// in order, one after the other) and once through one GetMany over all
// the keys, and compares, per key, the answer, the entry left in Redis and
// the loader calls. Get and GetMany are meant to run the same per-key
// protocol (read, classify, lease or refresh lease, load, fill, tombstone
// or release, stale-if-error, uncached load when Redis fails), so every
// difference is a protocol disagreement between the two implementations.
//
// A schedule fixes, per key: its starting entry, a race at the afterMiss
// hook (another process invalidates the key, takes its lease or refresh
// lease, or writes a new value, a tombstone or an entry this cache cannot
// decode), Redis faults on the key's lease scripts (reply lost: the script
// ran and the client got an error; failed: it did not run), whether the
// loader has a value for it, and how a lease held by another process ends.
// Schedule-wide: plain keys or one namespace, FailOpen or FailClosed, reads
// down, NoNegativeCache, whether the caller's context is cancelled at each
// miss (at the afterMiss hook: Get's own context for that key, GetMany's
// for the batch, which ends the same keys), and whether the loader
// succeeds, fails, panics or runs past LoadTimeout. A one-key namespaced
// schedule may also have the namespace bumped at the hook.
//
// Everything that could make the two runs differ for reasons other than
// the protocol is kept out:
//   - the clock is fake and never moves, XFetch is off and TTLs have no
//     jitter, so freshness decisions are the same in both runs;
//   - faults are keyed by (script, key) in a go-redis hook, so they hit
//     Get's single commands and GetMany's pipelined ones alike, and every
//     matching command of the run gets them (a protocol that sends a
//     script twice meets the fault twice in both runs);
//   - another process's lease ends when, and only when, one of the cache's
//     acquire scripts has seen it (in the hook, before the reply reaches
//     the cache), not after a delay, so Get's keys being processed later
//     than GetMany's does not change what they see;
//   - keys never influence each other, because Get processes them one after
//     the other and GetMany all at once, so anything one key's processing
//     does to the next key's would be an order effect GetMany cannot
//     reproduce. Hence: a namespaced schedule starts with its generation
//     key present (acquire.lua creates a missing one, which would turn the
//     later keys' reads from "no generation" into "other generation"); only
//     a one-key schedule bumps its namespace; MaxLoadsWhileDown (64) is
//     never reached, and
//     FailFastWhenCapped is off (Get takes a slot per key, GetMany one per
//     batch);
//   - no holder is left to be waited out: the wait cap is measured in real
//     time, which would make the outcome timing-dependent;
//   - with reads down no key has a race: Get does not reach afterMiss when
//     its read failed (it loads at once), GetMany calls it for every key,
//     so a race there would run in one run only;
//   - starting entries live 10 minutes in Redis (PX), the cache's leases
//     LeaseTTL 5s, and each run's entries are read right after its Close;
//   - before reading entries and loader calls the harness waits for the
//     background refreshes, then Close waits for the background releases.
//
// The test also fails when, over all schedules, one of the faults, races
// or lease endings never happened: the hooks would no longer match the
// code, and the test would be checking less than it says.
//
// Replay one schedule with CACHEASIDE_DIFF_SEED=<seed> (it is printed in
// full, on every backend, whether or not it disagrees); rerun a whole set
// with CACHEASIDE_DIFF_BASE=<base seed>.
func TestDifferentialGetVsGetMany(t *testing.T) {
	base, replay := diffSeed(t)
	forEachBackend(t, func(t *testing.T, b *backend) {
		n := diffSchedules
		if testing.Short() {
			n /= 4
		}
		if replay {
			n = 1
		}
		admin := b.client(t)
		cov := &diffCoverage{}
		workers := make([]*diffWorker, min(diffWorkers, n))
		for i := range workers {
			w := &diffWorker{b: b, admin: admin, rdb: b.client(t), hook: &diffHook{}, cov: cov}
			w.rdb.AddHook(w.hook)
			workers[i] = w
		}
		seeds := make(chan uint64)
		results := make(chan *diffResult)
		var wg sync.WaitGroup
		for _, w := range workers {
			wg.Go(func() {
				for seed := range seeds {
					results <- w.schedule(seed)
				}
			})
		}
		go func() {
			defer close(seeds)
			for i := range n {
				seeds <- base + uint64(i)
			}
		}()
		go func() { wg.Wait(); close(results) }()

		start := time.Now()
		var (
			failed, harness, keysRun int
			failedSeeds              []uint64
			groups                   = map[string]*diffGroup{}
		)
		for r := range results {
			keysRun += len(r.s.keys)
			switch {
			case r.err != nil:
				harness++
				t.Errorf("seed %d: harness error (not a protocol result): %v\n%s", r.s.seed, r.err, r.report())
			case len(r.diffs) > 0:
				failed++
				failedSeeds = append(failedSeeds, r.s.seed)
				if failed <= diffReport {
					t.Errorf("Get and GetMany disagree on seed %d (replay: %s=%d):\n%s", r.s.seed, diffEnvSeed, r.s.seed, r.report())
				}
				for _, d := range r.diffs {
					g := groups[d.class]
					if g == nil {
						g = &diffGroup{class: d.class, cfg: d.cfg}
						groups[d.class] = g
					}
					g.count++
				}
			case replay:
				t.Logf("seed %d: Get and GetMany agree:\n%s", r.s.seed, r.report())
			}
		}
		t.Logf("%s: %d schedules (%d keys) in %v, base seed %d", b.name, n, keysRun, time.Since(start).Round(time.Millisecond), base)
		t.Logf("harness coverage: %s", cov)
		if m := cov.missing(); !replay && len(m) > 0 {
			t.Errorf("the harness never made these happen, so the hooks no longer match the code: %v", m)
		}
		if failed == 0 && harness == 0 {
			return
		}
		slices.Sort(failedSeeds)
		var sb strings.Builder
		fmt.Fprintf(&sb, "%d of %d schedules disagree (%d printed in full above); replay one with %s=<seed>; the seeds:", failed, n, min(failed, diffReport), diffEnvSeed)
		for i, seed := range failedSeeds {
			if i%8 == 0 {
				sb.WriteString("\n   ")
			}
			fmt.Fprintf(&sb, " %d", seed)
		}
		sb.WriteString("\n")
		fmt.Fprintf(&sb, "kinds of per-key disagreement (values without their key number), each with the settings of one key that shows it:\n")
		all := slices.SortedFunc(maps.Values(groups), func(a, b *diffGroup) int {
			return cmp.Or(b.count-a.count, strings.Compare(a.class, b.class))
		})
		for i, g := range all {
			if i == diffGroups {
				fmt.Fprintf(&sb, "  … and %d more kinds\n", len(all)-i)
				break
			}
			fmt.Fprintf(&sb, "  %4d× %s\n        e.g. %s\n", g.count, g.class, g.cfg)
		}
		t.Error(sb.String())
	})
}

const (
	diffEnvSeed   = "CACHEASIDE_DIFF_SEED" // replay one schedule
	diffEnvBase   = "CACHEASIDE_DIFF_BASE" // run the schedules from this base seed on
	diffSchedules = 2000                   // per backend; a quarter with -short
	diffWorkers   = 8                      // schedules run at once (the work is mostly waiting on Redis)
	diffReport    = 3                      // failing schedules printed in full
	diffGroups    = 25                     // kinds of disagreement listed in the summary
	diffMaxKeys   = 8
	diffLongPX    = 10 * time.Minute // Redis lifetime of everything the harness writes
)

// diffSeed returns the base seed (schedule i uses base+i) and whether one
// schedule's seed was given to replay.
func diffSeed(t *testing.T) (uint64, bool) {
	if seed, ok := envSeed(t, diffEnvSeed); ok {
		t.Logf("replaying schedule %d", seed)
		return seed, true
	}
	seed := rand.Uint64() >> 2
	if base, ok := envSeed(t, diffEnvBase); ok {
		seed = base
	}
	t.Logf("base seed %d (schedule i uses seed base+i; replay one with %s=<seed>, rerun all with %s=<base>)", seed, diffEnvSeed, diffEnvBase)
	return seed, false
}

// The policy of every schedule: the fake clock never moves, so an entry's
// state is set by where its soft expiry lies relative to the clock.
var diffPolicy = Policy{
	TTL:                  10 * time.Minute,
	NegativeTTL:          time.Minute,
	NoJitter:             true,
	StaleWhileRevalidate: time.Minute,
	StaleIfError:         5 * time.Minute,
	NoEarlyRefresh:       true,
}

// Soft expiries of the starting entries, relative to the clock.
const (
	diffSoftFresh   = 5 * time.Minute
	diffSoftStale   = -30 * time.Second // inside StaleWhileRevalidate
	diffSoftSIE     = -2 * time.Minute  // past SWR, inside StaleIfError
	diffSoftExpired = -8 * time.Minute  // past both windows (the entry outlived its PX elsewhere)
	diffSoftNeg     = time.Minute
)

var (
	errDiffLoader = errors.New("difftest: loader failed")
	errDiffLost   = errors.New("difftest: connection lost after the command ran (reply lost)")
	errDiffFailed = errors.New("difftest: connection lost before the command was sent")
)

// A schedule.

type diffState uint8

const (
	dsAbsent     diffState = iota
	dsFresh                // a value inside its TTL
	dsStale                // inside StaleWhileRevalidate: served, refreshed in the background
	dsSIE                  // past SWR, inside StaleIfError: reloaded, served if the reload fails
	dsExpired              // past both windows but still in Redis
	dsTombstone            // "not found"
	dsLease                // a lease-only entry another process holds
	dsRefreshing           // a refreshing entry another process holds
	dsCorrupt              // undecodable (variant: foreign bytes, bad payload, other codec)
	dsWrongType            // a hash under the key
	dsOldGen               // a fresh value of an older namespace generation (namespaced only)
	dsCount
)

var diffStateNames = [...]string{"absent", "fresh", "stale(swr)", "stale(sie)", "expired", "tombstone", "lease(other)", "refreshing(other)", "corrupt", "wrong-type", "old-gen"}

var diffRefreshingSoft = [...]time.Duration{diffSoftFresh, diffSoftStale, diffSoftSIE}
var diffRefreshingNames = [...]string{"fresh", "swr", "sie"}
var diffCorruptNames = [...]string{"foreign-bytes", "bad-payload", "other-codec"}

type diffRace uint8

const (
	drNone      diffRace = iota
	drUnlink             // another process invalidates the key
	drLease              // another process takes the lease: a lease-only entry (as after its own invalidation and acquire)
	drRefresh            // another process takes the refresh lease on a value it can serve (else a lease-only entry)
	drValue              // another process writes a new value
	drTombstone          // another process writes a tombstone
	drForeign            // another process writes a value this cache cannot decode (another codec)
	drBump               // another process bumps the namespace (one-key namespaced schedules only)
	drCount
)

var diffRaceNames = [drCount]string{"none", "unlink", "takes-lease", "takes-refresh-lease", "writes-value", "writes-tombstone", "writes-undecodable", "bumps-namespace"}

// How a lease another process holds ends, once the cache has seen it.
type diffHolder uint8

const (
	dhFill      diffHolder = iota // fills a value
	dhTombstone                   // fills a tombstone
	dhRelease                     // releases (a refreshing entry goes back to its value)
)

var diffHolderNames = [...]string{"fills-value", "fills-tombstone", "releases"}

type diffFault uint8

const (
	dfAcquireLost diffFault = 1 << iota
	dfAcquireFail
	dfRefreshLost
	dfRefreshFail
	dfFillLost
	dfFillFail
	dfReleaseFail
	dfCount = 7
)

var diffFaultNames = [...]string{"acquire-reply-lost", "acquire-failed", "refresh-reply-lost", "refresh-failed", "fill-reply-lost", "fill-failed", "release-failed"}

func (f diffFault) String() string {
	var s []string
	for i := range dfCount {
		if f&(1<<i) != 0 {
			s = append(s, diffFaultNames[i])
		}
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ",")
}

type diffLoaderMode uint8

const (
	dlOK diffLoaderMode = iota
	dlFail
	dlPanic
	dlTimeout // blocks until its context ends: past LoadTimeout
)

var diffLoaderNames = [...]string{"succeeds", "fails", "panics", "times out"}

// diffLoadTimeout is LoadTimeout for schedules whose loader times out:
// the loader never returns before it, so its length decides nothing.
const diffLoadTimeout = 20 * time.Millisecond

type diffKey struct {
	state   diffState
	variant uint8 // dsRefreshing: soft expiry window; dsCorrupt: kind of damage
	race    diffRace
	holder  diffHolder
	faults  diffFault
	exists  bool // the loader has a value for it
}

type diffSchedule struct {
	seed       uint64
	namespaced bool
	tagged     bool // a namespaced schedule's generation is a tag's instead (Options.Tags: every key carries one tag)
	failClosed bool
	readsDown  bool // every GET/MGET fails
	noNegative bool // Policy.NoNegativeCache
	cancel     bool // the caller's context is cancelled at each miss's afterMiss (Get: each key's own; GetMany: the batch's)
	loader     diffLoaderMode
	keys       []diffKey
	per        GetOptions // the call's own choices, the same for Get and GetMany
	keepOld    bool       // the loader returns the old value it is shown (Reloading, ReloadingOf)
}

func newDiffSchedule(seed uint64) *diffSchedule {
	rng := rand.New(rand.NewPCG(seed, 0x6469666674657374))
	s := &diffSchedule{
		seed:       seed,
		namespaced: rng.IntN(5) < 2,
		failClosed: rng.IntN(4) == 0,
		readsDown:  rng.IntN(12) == 0,
		noNegative: rng.IntN(6) == 0,
	}
	switch x := rng.IntN(20); {
	case x < 10:
		s.loader = dlOK
	case x < 15:
		s.loader = dlFail
	case x < 17:
		s.loader = dlTimeout
	default:
		s.loader = dlPanic
	}
	// Cancellation and namespace bumps are drawn after the keys, from
	// their own stream, so the keys of a seed stay as they were.
	extra := rand.New(rand.NewPCG(seed, 0x6e65787464726177))
	s.cancel = !s.readsDown && extra.IntN(8) == 0 // with reads down Get never reaches afterMiss
	s.keys = make([]diffKey, 1+rng.IntN(diffMaxKeys))
	for i := range s.keys {
		k := &s.keys[i]
		states := int(dsCount)
		if !s.namespaced {
			states-- // dsOldGen is last
		}
		k.state = diffState(rng.IntN(states))
		switch k.state {
		case dsRefreshing:
			k.variant = uint8(rng.IntN(len(diffRefreshingSoft)))
		case dsCorrupt:
			k.variant = uint8(rng.IntN(len(diffCorruptNames)))
		}
		switch x := rng.IntN(14); {
		case x < 4 || s.readsDown:
			// With reads down Get never reaches afterMiss (it loads at
			// once), while GetMany calls it for every key: a race there
			// would run in one run only.
			k.race = drNone
		case x < 6:
			k.race = drUnlink
		case x < 8:
			k.race = drLease
		case x < 10:
			k.race = drRefresh
		case x < 12:
			k.race = drValue
		case x < 13:
			k.race = drTombstone
		default:
			k.race = drForeign
		}
		k.holder = diffHolder(rng.IntN(3))
		k.exists = rng.IntN(4) != 0
		nf := 0
		switch x := rng.IntN(10); {
		case x < 4:
		case x < 8:
			nf = 1
		default:
			nf = 2
		}
		for range nf {
			f := diffFault(1) << rng.IntN(dfCount)
			// At most one fault per script: lost and failed exclude each other.
			pair := map[diffFault]diffFault{dfAcquireLost: dfAcquireFail, dfAcquireFail: dfAcquireLost, dfRefreshLost: dfRefreshFail,
				dfRefreshFail: dfRefreshLost, dfFillLost: dfFillFail, dfFillFail: dfFillLost}[f]
			if k.faults&pair == 0 {
				k.faults |= f
			}
		}
	}
	// A bump changes what every key of the namespace reads; Get reads the
	// keys one after the other and GetMany all at once, so only a one-key
	// schedule can compare them.
	if s.namespaced && len(s.keys) == 1 && !s.readsDown && extra.IntN(2) == 0 {
		s.keys[0].race = drBump
	}
	switch extra.IntN(10) {
	case 0:
		s.per = GetOptions{Reload: true}
	case 1:
		s.per = GetOptions{NoStore: true}
	case 2:
		s.per = GetOptions{Reload: true, NoStore: true}
	case 3:
		s.per = GetOptions{TTL: 2 * time.Minute}
	}
	s.keepOld = extra.IntN(3) == 0
	// Drawn from a stream of its own, so older seeds keep what they drew.
	s.tagged = s.namespaced && rand.New(rand.NewPCG(seed, 0x74616767656421)).IntN(2) == 0
	return s
}

// holderMatters reports whether a holder's ending can be reached.
func (k *diffKey) holderMatters() bool {
	return k.state == dsLease || k.state == dsRefreshing || k.race == drLease || k.race == drRefresh
}

func (k *diffKey) String() string {
	st := diffStateNames[k.state]
	switch k.state {
	case dsRefreshing:
		st += "[" + diffRefreshingNames[k.variant] + "]"
	case dsCorrupt:
		st += "[" + diffCorruptNames[k.variant] + "]"
	}
	s := fmt.Sprintf("start=%s race=%s faults=%s loader-has-it=%v", st, diffRaceNames[k.race], k.faults, k.exists)
	if k.holderMatters() {
		s += " other-holder=" + diffHolderNames[k.holder]
	}
	return s
}

func (s *diffSchedule) String() string {
	mode := "plain keys"
	switch {
	case s.tagged:
		mode = "one tag"
	case s.namespaced:
		mode = "one namespace"
	}
	policy := "FailOpen"
	if s.failClosed {
		policy = "FailClosed"
	}
	reads := "reads ok"
	if s.readsDown {
		reads = "reads DOWN (every GET/MGET fails)"
	}
	if s.noNegative {
		policy += ", NoNegativeCache"
	}
	if s.cancel {
		reads += ", caller cancels at each miss"
	}
	if s.per != (GetOptions{}) {
		reads += fmt.Sprintf(", call options %+v", s.per)
	}
	if s.keepOld {
		reads += ", the loader keeps the old values it is shown"
	}
	return fmt.Sprintf("seed %d: %s, %s, %s, loader %s, %d keys", s.seed, mode, policy, reads, diffLoaderNames[s.loader], len(s.keys))
}

// One worker runs schedules one at a time on its own hooked client.

type diffWorker struct {
	b     *backend
	admin *redis.Client // the harness and the "other processes": no faults
	rdb   *redis.Client // the client the caches use: faults
	hook  *diffHook
	cov   *diffCoverage
}

// diffCoverage counts what the harness made happen, so a hook that stops
// matching (a script renamed, a hook moved) fails the test instead of
// silently testing less.
type diffCoverage struct {
	faults      [dfCount]atomic.Int64 // faults applied, by kind
	readsFailed atomic.Int64          // GET/MGET failed (reads down)
	races       [drCount]atomic.Int64 // afterMiss races run, by diffRace
	holders     [3]atomic.Int64       // other processes' leases ended, by diffHolder
	cancelled   atomic.Int64          // callers' contexts cancelled at a miss
	timedOut    atomic.Int64          // loader calls that ran past LoadTimeout
	tagged      atomic.Int64          // keys of tagged schedules run
	tagBumps    atomic.Int64          // of the bumps-namespace races, those that invalidated a tag
}

func (c *diffCoverage) String() string {
	var sb strings.Builder
	for i := range dfCount {
		fmt.Fprintf(&sb, "%s %d, ", diffFaultNames[i], c.faults[i].Load())
	}
	fmt.Fprintf(&sb, "reads failed %d; races:", c.readsFailed.Load())
	for i := 1; i < len(c.races); i++ {
		fmt.Fprintf(&sb, " %s %d", diffRaceNames[i], c.races[i].Load())
	}
	sb.WriteString("; other holders:")
	for i := range c.holders {
		fmt.Fprintf(&sb, " %s %d", diffHolderNames[i], c.holders[i].Load())
	}
	fmt.Fprintf(&sb, "; callers cancelled %d; loader timeouts %d; tagged keys %d (tags invalidated %d)", c.cancelled.Load(), c.timedOut.Load(), c.tagged.Load(), c.tagBumps.Load())
	return sb.String()
}

// missing names what never happened.
func (c *diffCoverage) missing() []string {
	var m []string
	for i := range dfCount {
		if c.faults[i].Load() == 0 {
			m = append(m, "fault "+diffFaultNames[i])
		}
	}
	if c.readsFailed.Load() == 0 {
		m = append(m, "reads down")
	}
	for i := 1; i < len(c.races); i++ {
		if c.races[i].Load() == 0 {
			m = append(m, "race "+diffRaceNames[i])
		}
	}
	for i := range c.holders {
		if c.holders[i].Load() == 0 {
			m = append(m, "other holder "+diffHolderNames[i])
		}
	}
	if c.cancelled.Load() == 0 {
		m = append(m, "caller cancelled")
	}
	if c.timedOut.Load() == 0 {
		m = append(m, "loader timeout")
	}
	if c.tagged.Load() == 0 || c.tagBumps.Load() == 0 {
		m = append(m, "tagged schedules and tag invalidations")
	}
	return m
}

// diffOutcome is what one run left: per key, the answer, the entry, and
// how often the loader was asked for its id.
type diffOutcome struct {
	answers []string
	errText []string
	entries []string
	calls   []int
	log     []string // the loader calls in order, for the report
}

type diffResult struct {
	s     *diffSchedule
	get   *diffOutcome
	many  *diffOutcome
	diffs []diffDiff
	err   error
}

type diffDiff struct {
	key   int
	what  string // "answer", "entry", "loader calls"
	class string // the disagreement with ids stripped, for the summary
	cfg   string // the schedule and key settings
}

type diffGroup struct {
	class string
	count int
	cfg   string // of the first key seen
}

func (w *diffWorker) schedule(seed uint64) *diffResult {
	s := newDiffSchedule(seed)
	r := &diffResult{s: s}
	if r.get, r.err = w.run(s, false); r.err != nil {
		return r
	}
	if r.many, r.err = w.run(s, true); r.err != nil {
		return r
	}
	for i := range s.keys {
		g, m := r.get, r.many
		// class names only what differs, values stripped of the key
		// number, so the summary groups keys by disagreement.
		var what, class []string
		if g.answers[i] != m.answers[i] {
			what = append(what, "answer")
			class = append(class, fmt.Sprintf("answer: Get %s vs GetMany %s", diffStrip(g.answers[i]), diffStrip(m.answers[i])))
		}
		if g.entries[i] != m.entries[i] {
			what = append(what, "entry")
			class = append(class, fmt.Sprintf("entry: Get %s vs GetMany %s", diffStrip(g.entries[i]), diffStrip(m.entries[i])))
		}
		if g.calls[i] != m.calls[i] {
			what = append(what, "loader calls")
			class = append(class, fmt.Sprintf("loader calls: Get %d vs GetMany %d", g.calls[i], m.calls[i]))
		}
		if len(what) == 0 {
			continue
		}
		cfg := fmt.Sprintf("%s; key %d: %s", s, i, &s.keys[i])
		r.diffs = append(r.diffs, diffDiff{key: i, what: strings.Join(what, "+"), class: strings.Join(class, "; "), cfg: cfg})
	}
	return r
}

// diffStrip drops the key number from the values of a description.
func diffStrip(s string) string {
	for _, p := range []string{"old-", "new-", "other-", "held-"} {
		for {
			i := strings.Index(s, p)
			if i < 0 {
				break
			}
			j := i + len(p)
			for j < len(s) && s[j] >= '0' && s[j] <= '9' {
				j++
			}
			if j == i+len(p) {
				break
			}
			s = s[:i] + strings.ToUpper(p[:len(p)-1]) + s[j:]
		}
	}
	return s
}

func (r *diffResult) report() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "  %s\n", r.s)
	differs := map[int]string{}
	for _, d := range r.diffs {
		differs[d.key] = d.what
	}
	for i := range r.s.keys {
		fmt.Fprintf(&sb, "  key %d: %s\n", i, &r.s.keys[i])
		for _, run := range []struct {
			name string
			o    *diffOutcome
		}{{"Get    ", r.get}, {"GetMany", r.many}} {
			if run.o == nil {
				continue
			}
			ans := run.o.answers[i]
			if run.o.errText[i] != "" {
				ans += " [" + run.o.errText[i] + "]"
			}
			fmt.Fprintf(&sb, "    %s answer=%s  entry=%s  loader calls for it=%d\n", run.name, ans, run.o.entries[i], run.o.calls[i])
		}
		if w, ok := differs[i]; ok {
			fmt.Fprintf(&sb, "    ^^^ %s differ(s)\n", w)
		}
	}
	if r.get != nil {
		fmt.Fprintf(&sb, "  loader calls, Get run:     %v\n", r.get.log)
	}
	if r.many != nil {
		fmt.Fprintf(&sb, "  loader calls, GetMany run: %v\n", r.many.log)
	}
	return sb.String()
}

// diffRun is the state of one run of a schedule: what the hook and the
// afterMiss race consult, and what the loaders record.
type diffRun struct {
	s      *diffSchedule
	admin  *redis.Client
	keys   []string
	index  map[string]int
	genKey string       // namespaced: the namespace's generation key, or the tag's (tagged)
	gen    envelope.Gen // namespaced: its (current) generation
	clk    *fakeClock
	cov    *diffCoverage

	mu      sync.Mutex
	cancels []context.CancelFunc // per key: cancels the context of the call that reads it
	holders []envelope.Token     // per key: the lease another process holds now (zero: none)
	raced   []bool
	calls   []int
	log     []string
	err     error // first harness failure
}

func (r *diffRun) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
}

func (r *diffRun) record(ids ...int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		r.calls[id]++
	}
	r.log = append(r.log, fmt.Sprint(ids))
}

// entry encodes an entry of this run (gen stamped in a namespace).
func (r *diffRun) entry(kind envelope.Kind, tok envelope.Token, soft time.Duration, payload []byte) []byte {
	e := &envelope.Entry{Kind: kind, Format: formatJSON, Token: tok, LoadMillis: 1, Payload: payload}
	if soft != 0 {
		e.SoftExpiry = r.clk.Now().Add(soft).UnixMilli()
	}
	if r.genKey != "" {
		r.mu.Lock()
		e.Gen = r.stamp(r.gen)
		r.mu.Unlock()
	}
	return envelope.Encode(e)
}

// stamp is what an entry of generation g carries: g in a namespace, the
// digest of the one tag's generation in a tagged schedule.
func (r *diffRun) stamp(g envelope.Gen) envelope.Gen {
	if r.s.tagged {
		return tagView([][]byte{g[:]}).gen
	}
	return g
}

// fillGenKey is the generation key fill.lua checks: none for a tag.
func (r *diffRun) fillGenKey() string {
	if r.s.tagged {
		return ""
	}
	return r.genKey
}

func diffJSON(v string) []byte {
	b, _ := json.Marshal(v)
	return b
}

// setup writes the starting state of key i.
func (r *diffRun) setup(ctx context.Context, p redis.Pipeliner, i int) {
	k := &r.s.keys[i]
	key := r.keys[i]
	old := diffJSON(fmt.Sprintf("old-%d", i))
	var b []byte
	switch k.state {
	case dsAbsent:
		return
	case dsFresh:
		b = r.entry(envelope.Value, newToken(), diffSoftFresh, old)
	case dsStale:
		b = r.entry(envelope.Value, newToken(), diffSoftStale, old)
	case dsSIE:
		b = r.entry(envelope.Value, newToken(), diffSoftSIE, old)
	case dsExpired:
		b = r.entry(envelope.Value, newToken(), diffSoftExpired, old)
	case dsTombstone:
		b = r.entry(envelope.NotFound, newToken(), diffSoftNeg, nil)
	case dsLease:
		r.holders[i] = newToken()
		b = r.entry(envelope.Lease, r.holders[i], 0, nil)
	case dsRefreshing:
		r.holders[i] = newToken()
		b = r.entry(envelope.Refreshing, r.holders[i], diffRefreshingSoft[k.variant], old)
	case dsCorrupt:
		switch k.variant {
		case 0:
			b = []byte("not a cacheaside entry")
		case 1:
			b = r.entry(envelope.Value, newToken(), diffSoftFresh, []byte(`{"broken`))
		default:
			var e envelope.Entry
			_ = envelope.Decode(r.entry(envelope.Value, newToken(), diffSoftFresh, old), &e)
			e.Format = formatMsgpack
			b = envelope.Encode(&e)
		}
	case dsWrongType:
		p.HSet(ctx, key, "field", "foreign")
		p.PExpire(ctx, key, diffLongPX)
		return
	case dsOldGen:
		var e envelope.Entry
		_ = envelope.Decode(r.entry(envelope.Value, newToken(), diffSoftFresh, old), &e)
		e.Gen = newGen()
		b = envelope.Encode(&e)
	}
	p.Set(ctx, key, b, diffLongPX)
}

// afterMiss is the cache's afterMiss hook: the key's race, once.
func (r *diffRun) afterMiss(key string) {
	i, ok := r.index[key]
	if !ok {
		r.fail(fmt.Errorf("afterMiss for unknown key %q", key))
		return
	}
	r.mu.Lock()
	if r.s.cancel && r.cancels[i] != nil {
		r.cancels[i]()
		r.cancels[i] = nil
		r.cov.cancelled.Add(1)
	}
	if r.raced[i] {
		r.mu.Unlock()
		return
	}
	r.raced[i] = true
	r.mu.Unlock()
	r.cov.races[r.s.keys[i].race].Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	switch r.s.keys[i].race {
	case drUnlink:
		if err := r.admin.Unlink(ctx, key).Err(); err != nil {
			r.fail(fmt.Errorf("race unlink %s: %w", key, err))
		}
		r.setHolder(i, envelope.Token{})
	case drValue, drTombstone, drForeign:
		b := r.entry(envelope.Value, newToken(), diffSoftFresh, diffJSON(fmt.Sprintf("other-%d", i)))
		switch r.s.keys[i].race {
		case drTombstone:
			b = r.entry(envelope.NotFound, newToken(), diffSoftNeg, nil)
		case drForeign:
			b[3] = formatMsgpack // the format byte: decodable header, foreign codec
		}
		if err := r.admin.Set(ctx, key, b, diffLongPX).Err(); err != nil {
			r.fail(fmt.Errorf("race write %s: %w", key, err))
		}
		r.setHolder(i, envelope.Token{})
	case drLease, drRefresh:
		// drRefresh: a value it could serve becomes refreshing (the
		// refresh lease); anything else, and everything for drLease, is
		// replaced by a lease-only entry.
		tok := newToken()
		b := r.entry(envelope.Lease, tok, 0, nil)
		if cur, err := r.admin.Get(ctx, key).Bytes(); err == nil && r.s.keys[i].race == drRefresh {
			var e envelope.Entry
			var v string
			if envelope.Decode(cur, &e) == nil && (e.Kind == envelope.Value || e.Kind == envelope.Refreshing) &&
				e.Format == formatJSON && json.Unmarshal(e.Payload, &v) == nil && (r.genKey == "" || e.Gen == r.stamp(r.curGen())) {
				e.Kind, e.Token = envelope.Refreshing, tok
				b = envelope.Encode(&e)
			}
		}
		if err := r.admin.Set(ctx, key, b, diffLongPX).Err(); err != nil {
			r.fail(fmt.Errorf("race lease %s: %w", key, err))
		}
		r.setHolder(i, tok)
	case drBump:
		// As InvalidateNamespace does: a new generation, so the key's
		// entry (and any lease on it) belongs to an old one.
		g := newGen()
		if err := r.admin.Set(ctx, r.genKey, g[:], diffLongPX).Err(); err != nil {
			r.fail(fmt.Errorf("race bump %s: %w", r.genKey, err))
		}
		r.mu.Lock()
		r.gen = g
		r.mu.Unlock()
		if r.s.tagged {
			r.cov.tagBumps.Add(1)
		}
		r.setHolder(i, envelope.Token{})
	}
}

// tagName is the one tag of a tagged schedule's keys.
func (r *diffRun) tagName(w *diffWorker) string {
	return w.b.prefix + "t" + strconv.FormatUint(r.s.seed, 10)
}

func (r *diffRun) curGen() envelope.Gen {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gen
}

func (r *diffRun) setHolder(i int, tok envelope.Token) {
	r.mu.Lock()
	r.holders[i] = tok
	r.mu.Unlock()
}

// Scripts the hook recognizes.
type diffScript uint8

const (
	dsNone diffScript = iota
	dsAcquire
	dsRefresh
	dsFill
	dsRelease
)

var diffScripts = []struct {
	s    *redis.Script
	src  string
	kind diffScript
}{
	{acquireScript, acquireLua, dsAcquire},
	{refreshScript, refreshLua, dsRefresh},
	{fillScript, fillLua, dsFill},
	{releaseScript, releaseLua, dsRelease},
}

type diffInject uint8

const (
	diNone diffInject = iota
	diLost            // run it, then fail it
	diFail            // do not run it
)

// classify names the script and key index of cmd (dsNone if it is not a
// lease script on one of the run's keys).
func (r *diffRun) classify(cmd redis.Cmder) (diffScript, int) {
	args := cmd.Args()
	if len(args) < 4 {
		return dsNone, 0
	}
	name, _ := args[0].(string)
	if name = strings.ToLower(name); name != "evalsha" && name != "eval" {
		return dsNone, 0
	}
	body, _ := args[1].(string)
	key, _ := args[3].(string)
	i, ok := r.index[key]
	if !ok {
		return dsNone, 0
	}
	for _, sc := range diffScripts {
		if body == sc.s.Hash() || body == sc.src {
			return sc.kind, i
		}
	}
	return dsNone, 0
}

// inject decides the fault for cmd, and names it (0 for a read).
func (r *diffRun) inject(cmd redis.Cmder) (diffInject, diffFault) {
	args := cmd.Args()
	if len(args) == 0 {
		return diNone, 0
	}
	name, _ := args[0].(string)
	switch strings.ToLower(name) {
	case "get", "mget":
		if r.s.readsDown {
			return diFail, 0
		}
		return diNone, 0
	}
	kind, i := r.classify(cmd)
	if kind == dsNone {
		return diNone, 0
	}
	f := r.s.keys[i].faults
	var lost, failed diffFault
	switch kind {
	case dsAcquire:
		lost, failed = dfAcquireLost, dfAcquireFail
	case dsRefresh:
		lost, failed = dfRefreshLost, dfRefreshFail
	case dsFill:
		lost, failed = dfFillLost, dfFillFail
	case dsRelease:
		failed = dfReleaseFail
	default:
		return diNone, 0
	}
	switch {
	case f&failed != 0:
		return diFail, failed
	case f&lost != 0:
		return diLost, lost
	}
	return diNone, 0
}

// injected counts a fault that was applied.
func (r *diffRun) injected(f diffFault) {
	if f == 0 {
		r.cov.readsFailed.Add(1)
		return
	}
	for i := range dfCount {
		if f == 1<<i {
			r.cov.faults[i].Add(1)
		}
	}
}

// observe runs after cmd reached Redis, before its reply reaches the
// cache: when an acquire script found another process's lease, that
// holder ends it now (fill, tombstone or release), so the cache sees the
// outcome on its next look, in both runs alike.
func (r *diffRun) observe(cmd redis.Cmder, cmdErr error) {
	kind, i := r.classify(cmd)
	if kind != dsAcquire || cmdErr != nil {
		return
	}
	c, ok := cmd.(*redis.Cmd)
	if !ok {
		return
	}
	res, _ := c.Val().([]any)
	if len(res) != 3 {
		return
	}
	if n, _ := res[0].(int64); n != 0 {
		return
	}
	cur, _ := res[2].(string)
	var e envelope.Entry
	if envelope.Decode([]byte(cur), &e) != nil {
		return
	}
	r.mu.Lock()
	tok := r.holders[i]
	if tok == (envelope.Token{}) || tok != e.Token {
		r.mu.Unlock()
		return
	}
	r.holders[i] = envelope.Token{} // it ends once
	r.mu.Unlock()
	r.cov.holders[r.s.keys[i].holder].Add(1)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	key := r.keys[i]
	var err error
	switch r.s.keys[i].holder {
	case dhFill:
		b := r.entry(envelope.Value, tok, diffSoftFresh, diffJSON(fmt.Sprintf("held-%d", i)))
		_, err = fill(ctx, r.admin, key, r.fillGenKey(), tok, b, diffLongPX, diffLongPX)
	case dhTombstone:
		b := r.entry(envelope.NotFound, tok, diffSoftNeg, nil)
		_, err = fill(ctx, r.admin, key, r.fillGenKey(), tok, b, diffLongPX, diffLongPX)
	case dhRelease:
		_, err = release(ctx, r.admin, key, tok, diffLongPX)
	}
	if err != nil {
		r.fail(fmt.Errorf("other holder of %s: %w", key, err))
	}
}

// diffHook injects the run's faults into the cache's client, on single
// commands and pipelines alike.
type diffHook struct{ run atomic.Pointer[diffRun] }

func (h *diffHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *diffHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r := h.run.Load()
		if r == nil {
			return next(ctx, cmd)
		}
		inj, f := r.inject(cmd)
		if inj == diFail {
			r.injected(f)
			cmd.SetErr(errDiffFailed)
			return errDiffFailed
		}
		// Inside the hook a single command's error is what next returns:
		// Client.Process sets it on cmd only afterwards.
		err := next(ctx, cmd)
		r.observe(cmd, err)
		if inj == diLost && !diffNoScript(err) {
			r.injected(f)
			cmd.SetErr(errDiffLost)
			return errDiffLost
		}
		return err
	}
}

func (h *diffHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r := h.run.Load()
		if r == nil {
			return next(ctx, cmds)
		}
		inj := make([]diffInject, len(cmds))
		faults := make([]diffFault, len(cmds))
		send := make([]redis.Cmder, 0, len(cmds))
		for i, cmd := range cmds {
			if inj[i], faults[i] = r.inject(cmd); inj[i] != diFail {
				send = append(send, cmd)
			}
		}
		var err error
		if len(send) > 0 {
			err = next(ctx, send)
		}
		for i, cmd := range cmds {
			switch inj[i] {
			case diFail:
				r.injected(faults[i])
				cmd.SetErr(errDiffFailed)
				continue
			case diLost:
				r.observe(cmd, cmd.Err())
				if !diffNoScript(cmd.Err()) {
					r.injected(faults[i])
					cmd.SetErr(errDiffLost)
				}
			default:
				r.observe(cmd, cmd.Err())
			}
		}
		for _, cmd := range cmds {
			if e := cmd.Err(); e != nil {
				return e
			}
		}
		return err
	}
}

// diffNoScript: an EVALSHA the server could not run; the script did not
// run, so its fault waits for the EVAL that follows.
func diffNoScript(err error) bool {
	return err != nil && (errors.Is(err, redis.ErrNoScript) || strings.HasPrefix(err.Error(), "NOSCRIPT"))
}

// run runs schedule s through Get (many false) or GetMany on a fresh copy
// of its starting state.
func (w *diffWorker) run(s *diffSchedule, many bool) (*diffOutcome, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tag := "get"
	if many {
		tag = "many"
	}
	r := &diffRun{s: s, admin: w.admin, index: map[string]int{}, clk: newFakeClock(), cov: w.cov,
		holders: make([]envelope.Token, len(s.keys)), raced: make([]bool, len(s.keys)), calls: make([]int, len(s.keys)),
		cancels: make([]context.CancelFunc, len(s.keys))}
	var ns Namespace
	switch {
	case s.tagged:
		// The tag's name is unique to the run, as the namespace is.
		r.genKey, r.gen = wire.TagKeyPrefix+wire.EscapePart("diff-"+tag)+":"+wire.EscapePart(r.tagName(w)), newGen()
	case s.namespaced:
		ns = MustKeyspace("diff", 1).Namespace(w.b.prefix, strconv.FormatUint(s.seed, 10), tag)
		r.genKey, r.gen = ns.genKey(), newGen()
	}
	for i := range s.keys {
		var k string
		if s.namespaced && !s.tagged {
			k = ns.Key("k", strconv.Itoa(i))
		} else {
			k = w.b.key(fmt.Sprintf("diff:%d:%s:%d", s.seed, tag, i))
		}
		r.keys = append(r.keys, k)
		r.index[k] = i
	}
	all := slices.Clone(r.keys)
	if r.genKey != "" {
		all = append(all, r.genKey)
	}
	defer w.admin.Unlink(context.Background(), all...)

	if _, err := w.admin.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Unlink(ctx, all...)
		if r.genKey != "" {
			p.Set(ctx, r.genKey, r.gen[:], diffLongPX)
		}
		for i := range s.keys {
			r.setup(ctx, p, i)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}

	o := &Options[string]{
		Name:             "diff-" + tag,
		Policy:           diffPolicy,
		Namespaced:       s.namespaced && !s.tagged,
		NoReadCoalescing: true,
		LoadTimeout:      time.Second,
		LeaseTTL:         5 * time.Second,
		PollMin:          time.Millisecond,
		PollMax:          4 * time.Millisecond,
		Clock:            r.clk.Now,
		Degradation:      Degradation{NoBreaker: true, OpTimeout: 2 * time.Second},
	}
	if s.tagged {
		name := r.tagName(w)
		o.Tags = func(string) []string { return []string{name} }
		r.cov.tagged.Add(int64(len(s.keys)))
	}
	if s.failClosed {
		o.Degradation.OnRedisDown = FailClosed
	}
	if s.loader == dlTimeout {
		o.LoadTimeout = diffLoadTimeout
	}
	o.Policy.NoNegativeCache = s.noNegative
	w.hook.run.Store(r)
	defer w.hook.run.Store(nil)
	c, err := New[string](w.rdb, o)
	if err != nil {
		return nil, err
	}
	defer c.Close() // for the error paths; closing twice is fine
	idle := diffInternals(c, r.afterMiss)

	out := &diffOutcome{answers: make([]string, len(s.keys)), errText: make([]string, len(s.keys))}
	answer := func(i int, v string, found bool, err error) {
		switch {
		case err != nil && errors.Is(err, ErrNotFound):
			out.answers[i] = "not-found"
		case err != nil:
			out.answers[i] = "error(" + diffErrClass(err) + ")"
			out.errText[i] = err.Error()
		case !found:
			out.answers[i] = "not-found"
		default:
			out.answers[i] = "value(" + v + ")"
		}
	}
	mode := s.loader
	timeout := func(lctx context.Context) error {
		<-lctx.Done()
		r.cov.timedOut.Add(1)
		return lctx.Err()
	}
	if !many {
		for i, key := range r.keys {
			kctx, kcancel := context.WithCancel(ctx)
			r.mu.Lock()
			r.cancels[i] = kcancel
			r.mu.Unlock()
			v, err := c.Get(kctx, key, func(lctx context.Context) (string, error) {
				r.record(i)
				switch mode {
				case dlFail:
					return "", errDiffLoader
				case dlPanic:
					panic("difftest: loader panicked")
				case dlTimeout:
					return "", timeout(lctx)
				}
				if !s.keys[i].exists {
					return "", ErrNotFound
				}
				if old, ok := Reloading[string](lctx); ok && s.keepOld {
					return old.Value, nil
				}
				return fmt.Sprintf("new-%d", i), nil
			}, s.per)
			kcancel()
			answer(i, v, true, err)
		}
	} else {
		idList := make([]int, len(s.keys))
		for i := range idList {
			idList[i] = i
		}
		bctx, bcancel := context.WithCancel(ctx)
		defer bcancel()
		r.mu.Lock()
		for i := range r.cancels {
			r.cancels[i] = bcancel
		}
		r.mu.Unlock()
		m, err := GetMany(bctx, c, idList, func(id int) string { return r.keys[id] }, func(lctx context.Context, asked []int) (map[int]string, error) {
			r.record(asked...)
			switch mode {
			case dlFail:
				return nil, errDiffLoader
			case dlPanic:
				panic("difftest: loader panicked")
			case dlTimeout:
				return nil, timeout(lctx)
			}
			got := map[int]string{}
			for _, id := range asked {
				if !s.keys[id].exists {
					continue
				}
				got[id] = fmt.Sprintf("new-%d", id)
				if old, ok := ReloadingOf[int, string](lctx, id); ok && s.keepOld {
					got[id] = old.Value
				}
			}
			return got, nil
		}, s.per)
		keyErr := map[string]error{}
		var walk func(error) error
		walk = func(e error) error {
			if e == nil {
				return nil
			}
			if ke, ok := e.(*KeyError); ok {
				keyErr[ke.Key] = ke.Err
				return nil
			}
			u, ok := e.(interface{ Unwrap() []error })
			if !ok {
				return e
			}
			for _, e := range u.Unwrap() {
				if err := walk(e); err != nil {
					return err
				}
			}
			return nil
		}
		if other := walk(err); other != nil {
			return nil, fmt.Errorf("GetMany returned an error that is not a *KeyError: %w", other)
		}
		for i, key := range r.keys {
			if e, ok := keyErr[key]; ok {
				answer(i, "", false, e)
				continue
			}
			v, found := m[i]
			answer(i, v, found, nil)
		}
	}

	// Background work: refreshes and loads first (Close would cancel
	// them), then Close waits for the background lease releases.
	deadline := time.Now().Add(20 * time.Second)
	for !idle() {
		if time.Now().After(deadline) {
			return nil, errors.New("a background refresh or load did not end within 20s")
		}
		time.Sleep(time.Millisecond)
	}
	_ = c.Close()
	w.hook.run.Store(nil)

	r.mu.Lock()
	out.calls, out.log = slices.Clone(r.calls), slices.Clone(r.log)
	herr := r.err
	r.mu.Unlock()
	if herr != nil {
		return nil, herr
	}
	if out.entries, err = r.snapshot(ctx); err != nil {
		return nil, err
	}
	return out, nil
}

// snapshot describes the entry of each key: absent, its type if not a
// string, its raw bytes if not an envelope, else kind, value, whether its
// namespace generation is current and whether it has a TTL.
func (r *diffRun) snapshot(ctx context.Context) ([]string, error) {
	type q struct {
		typ  *redis.StatusCmd
		val  *redis.StringCmd
		pttl *redis.DurationCmd
	}
	qs := make([]q, len(r.keys))
	var gen *redis.StringCmd
	_, err := r.admin.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range r.keys {
			qs[i] = q{p.Type(ctx, k), p.Get(ctx, k), p.PTTL(ctx, k)}
		}
		if r.genKey != "" {
			gen = p.Get(ctx, r.genKey)
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) && !strings.HasPrefix(err.Error(), "WRONGTYPE") {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	var cur []byte
	if gen != nil {
		cur, _ = gen.Bytes()
	}
	out := make([]string, len(r.keys))
	for i := range r.keys {
		typ := qs[i].typ.Val()
		pttl := qs[i].pttl.Val()
		ttl := " no-ttl"
		if pttl > 0 {
			ttl = " ttl"
		}
		if typ == "none" {
			out[i] = "absent"
			continue
		}
		if typ != "string" {
			out[i] = "type " + typ + ttl
			continue
		}
		b, _ := qs[i].val.Bytes()
		var e envelope.Entry
		if err := envelope.Decode(b, &e); err != nil {
			out[i] = fmt.Sprintf("bytes %q%s", b, ttl)
			continue
		}
		s := e.Kind.String()
		if e.Kind == envelope.Value || e.Kind == envelope.Refreshing {
			var v string
			if e.Format == formatJSON && json.Unmarshal(e.Payload, &v) == nil {
				s += "(" + v + ")"
			} else {
				s += fmt.Sprintf("(format %d, payload %q)", e.Format, e.Payload)
			}
		}
		if r.genKey != "" {
			if len(cur) == envelope.GenSize && e.Gen == r.stamp(envelope.Gen(cur)) {
				s += " gen=current"
			} else {
				s += " gen=old"
			}
		}
		out[i] = s + ttl
	}
	return out, nil
}

// diffErrClass is the class of an error answer (its text is not compared).
func diffErrClass(err error) string {
	switch {
	case errors.Is(err, ErrLoaderPanic):
		return "loader-panic"
	case errors.Is(err, errDiffLoader):
		return "loader-error"
	case errors.Is(err, ErrRedisUnavailable):
		return "redis-unavailable"
	case errors.Is(err, ErrOverloaded):
		return "overloaded"
	case errors.Is(err, ErrClosed):
		return "closed"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	}
	return "other"
}
