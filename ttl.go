// TTL policies and the TTL table.

package cacheaside

import (
	"fmt"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Policy says how long entries live. The zero Policy is valid and means the
// defaults written beside each field.
//
// Every lifetime the cache writes to Redis is jittered: a value's TTL is
// drawn uniformly from [TTL·(1−Jitter), TTL], so entries filled together
// do not expire together, and TTL stays the upper bound on how long an entry
// can be served.
type Policy struct {
	// TTL is how long a value stays in Redis after it is filled.
	// Default 5m; at least 1ms.
	TTL time.Duration

	// NegativeTTL is how long a "not found" answer is cached.
	// Default 60s, or TTL when that is shorter; at least 1ms. Keep it
	// short: a create must clear the tombstone (Invalidate or Set), or
	// readers see "not found" until it expires. New logs a warning when it
	// is set longer than TTL.
	NegativeTTL time.Duration

	// NoNegativeCache turns negative caching off: every Get of a missing
	// item calls the loader (still once per key at a time). Default false.
	NoNegativeCache bool

	// Jitter is the fraction by which each TTL is randomly shortened, in
	// [0, 1). Default 0.1 (10%); set NoJitter to use exact TTLs.
	Jitter float64

	// NoJitter writes every TTL exactly as configured. Default false.
	NoJitter bool

	// StaleWhileRevalidate is how long past its TTL a value is still
	// served, while one background refresh replaces it. Default 0 (off).
	StaleWhileRevalidate time.Duration

	// StaleIfError is how long past its TTL a value is kept to be served
	// when reloading it fails (the loader's error is then only reported).
	// Default 0 (off).
	StaleIfError time.Duration

	// Beta scales XFetch early refresh: a fresh value is reloaded in the
	// background shortly before its TTL ends, with a probability that
	// grows as the end nears and with how long its load took. Larger is
	// earlier. Default 1; set NoEarlyRefresh to turn it off.
	Beta float64

	// NoEarlyRefresh turns XFetch off. Default false.
	NoEarlyRefresh bool
}

// Policy defaults.
const (
	defaultTTL         = wire.DefaultTTL
	defaultNegativeTTL = 60 * time.Second
	defaultJitter      = 0.1
	defaultBeta        = 1.0
)

// validate reports the first setting of p that is out of range.
func (p Policy) validate() error {
	if p.TTL < 0 {
		return fmt.Errorf("%w: policy TTL %v is negative", ErrInvalidOptions, p.TTL)
	}
	if p.TTL != 0 && p.TTL < time.Millisecond {
		return fmt.Errorf("%w: policy TTL %v is below 1ms", ErrInvalidOptions, p.TTL)
	}
	if p.NegativeTTL < 0 {
		return fmt.Errorf("%w: policy NegativeTTL %v is negative", ErrInvalidOptions, p.NegativeTTL)
	}
	if p.NegativeTTL != 0 && p.NegativeTTL < time.Millisecond {
		return fmt.Errorf("%w: policy NegativeTTL %v is below 1ms", ErrInvalidOptions, p.NegativeTTL)
	}
	if p.Jitter < 0 || p.Jitter >= 1 || p.Jitter != p.Jitter {
		return fmt.Errorf("%w: policy Jitter %v is outside [0, 1)", ErrInvalidOptions, p.Jitter)
	}
	if p.NoJitter && p.Jitter != 0 {
		return fmt.Errorf("%w: policy sets both Jitter %v and NoJitter", ErrInvalidOptions, p.Jitter)
	}
	if p.StaleWhileRevalidate < 0 {
		return fmt.Errorf("%w: policy StaleWhileRevalidate %v is negative", ErrInvalidOptions, p.StaleWhileRevalidate)
	}
	if p.StaleIfError < 0 {
		return fmt.Errorf("%w: policy StaleIfError %v is negative", ErrInvalidOptions, p.StaleIfError)
	}
	if p.Beta < 0 || math.IsNaN(p.Beta) || math.IsInf(p.Beta, 0) {
		return fmt.Errorf("%w: policy Beta %v must be a finite number ≥ 0", ErrInvalidOptions, p.Beta)
	}
	if p.NoEarlyRefresh && p.Beta != 0 {
		return fmt.Errorf("%w: policy sets both Beta %v and NoEarlyRefresh", ErrInvalidOptions, p.Beta)
	}
	return nil
}

// staleWindow is how long past its TTL a value stays in Redis.
func (p Policy) staleWindow() time.Duration { return max(p.StaleWhileRevalidate, p.StaleIfError) }

// resolved returns p with defaults filled in. p must be valid.
func (p Policy) resolved() Policy {
	if p.TTL == 0 {
		p.TTL = defaultTTL
	}
	if p.NegativeTTL == 0 {
		p.NegativeTTL = min(defaultNegativeTTL, p.TTL)
	}
	switch {
	case p.NoJitter:
		p.Jitter = 0
	case p.Jitter == 0:
		p.Jitter = defaultJitter
	}
	switch {
	case p.NoEarlyRefresh:
		p.Beta = 0
	case p.Beta == 0:
		p.Beta = defaultBeta
	}
	return p
}

// jitter shortens d by a random fraction of at most p.Jitter, never below
// 1ms. p must be resolved.
func (p Policy) jitter(d time.Duration) time.Duration {
	if p.Jitter > 0 {
		d -= time.Duration(float64(d) * p.Jitter * rand.Float64())
	}
	return max(d, time.Millisecond)
}

// TTLTable is a validated set of named policies, one per kind of cached
// item, so an application keeps every lifetime decision in one place:
//
//	ttls, err := cacheaside.NewTTLTable(map[string]cacheaside.Policy{
//		"task":      {TTL: 5 * time.Minute, NegativeTTL: 60 * time.Second},
//		"task_list": {TTL: 60 * time.Second},
//	})
//	...
//	ttls, err = ttls.WithOverrides(os.Getenv("CACHE_TTLS")) // "task=2m,task_list=30s"
//
// A TTLTable is immutable and safe for concurrent use.
type TTLTable struct {
	m map[string]Policy
}

// NewTTLTable validates every policy and copies the map.
func NewTTLTable(policies map[string]Policy) (*TTLTable, error) {
	for _, name := range slices.Sorted(maps.Keys(policies)) {
		if err := checkPolicyName(name); err != nil {
			return nil, err
		}
		if err := policies[name].validate(); err != nil {
			return nil, fmt.Errorf("policy %q: %w", name, err)
		}
	}
	return &TTLTable{m: maps.Clone(policies)}, nil
}

// Get returns the policy called name. It panics if the table has no such
// policy: a misspelt name is a programming error that should stop the
// program at start-up, not silently give a cache the default lifetimes.
func (t *TTLTable) Get(name string) Policy {
	p, ok := t.m[name]
	if !ok {
		panic(fmt.Sprintf("cacheaside: TTL table has no policy %q (have %s)", name, strings.Join(t.Names(), ", ")))
	}
	return p
}

// Names returns the policy names in sorted order.
func (t *TTLTable) Names() []string {
	return slices.Sorted(maps.Keys(t.m))
}

// WithOverrides returns a copy of t with the settings in spec applied; t is
// unchanged. spec is a comma-separated list of assignments, typically read
// by the application from an environment variable (the library reads none):
//
//	task=2m                  TTL of policy "task"
//	task.ttl=2m              the same
//	task.negative=30s        its NegativeTTL
//	task.negative=off        turn its negative caching off
//	task.jitter=0.2          its Jitter (0 turns jitter off)
//	task.swr=30s             its StaleWhileRevalidate window (0s turns it off)
//	task.sie=5m              its StaleIfError window (0s turns it off)
//	task.beta=2              its XFetch Beta (0 turns early refresh off)
//
// Durations use time.ParseDuration syntax and must be positive (the stale
// windows also take 0). An unknown
// policy or field, a malformed value or a policy set twice is an error that
// names the offending assignment; on error nothing is applied. An empty spec
// returns t.
func (t *TTLTable) WithOverrides(spec string) (*TTLTable, error) {
	if strings.TrimSpace(spec) == "" {
		return t, nil
	}
	out := maps.Clone(t.m)
	seen := make(map[string]bool)
	for item := range strings.SplitSeq(spec, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		lhs, val, ok := strings.Cut(item, "=")
		lhs, val = strings.TrimSpace(lhs), strings.TrimSpace(val)
		if !ok || lhs == "" || val == "" {
			return nil, fmt.Errorf("%w: TTL override %q: want name=duration", ErrInvalidOptions, item)
		}
		name, field, hasField := strings.Cut(lhs, ".")
		if !hasField {
			field = "ttl"
		}
		p, known := out[name]
		if !known {
			return nil, fmt.Errorf("%w: TTL override %q: no policy %q (have %s)", ErrInvalidOptions, item, name, strings.Join(t.Names(), ", "))
		}
		if seen[name+"."+field] {
			return nil, fmt.Errorf("%w: TTL override %q: %s.%s is set twice", ErrInvalidOptions, item, name, field)
		}
		seen[name+"."+field] = true
		switch field {
		case "ttl":
			d, err := parsePositive(val)
			if err != nil {
				return nil, fmt.Errorf("%w: TTL override %q: %v", ErrInvalidOptions, item, err)
			}
			p.TTL = d
		case "negative":
			if val == "off" {
				p.NoNegativeCache = true
				p.NegativeTTL = 0
				break
			}
			d, err := parsePositive(val)
			if err != nil {
				return nil, fmt.Errorf("%w: TTL override %q: %v", ErrInvalidOptions, item, err)
			}
			p.NegativeTTL, p.NoNegativeCache = d, false
		case "jitter":
			f, err := strconv.ParseFloat(val, 64)
			if err != nil {
				return nil, fmt.Errorf("%w: TTL override %q: jitter is not a number", ErrInvalidOptions, item)
			}
			p.Jitter, p.NoJitter = f, f == 0
		case "swr", "sie":
			d, err := time.ParseDuration(val)
			if err != nil || d < 0 {
				return nil, fmt.Errorf("%w: TTL override %q: want a duration ≥ 0", ErrInvalidOptions, item)
			}
			if field == "swr" {
				p.StaleWhileRevalidate = d
			} else {
				p.StaleIfError = d
			}
		case "beta":
			f, err := strconv.ParseFloat(val, 64)
			if err != nil {
				return nil, fmt.Errorf("%w: TTL override %q: beta is not a number", ErrInvalidOptions, item)
			}
			p.Beta, p.NoEarlyRefresh = f, f == 0
		default:
			return nil, fmt.Errorf("%w: TTL override %q: unknown field %q (want ttl, negative, jitter, swr, sie or beta)", ErrInvalidOptions, item, field)
		}
		if err := p.validate(); err != nil {
			return nil, fmt.Errorf("TTL override %q: %w", item, err)
		}
		out[name] = p
	}
	return &TTLTable{m: out}, nil
}

func parsePositive(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if d <= 0 {
		return 0, fmt.Errorf("duration %v must be positive", d)
	}
	return d, nil
}

func checkPolicyName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty policy name", ErrInvalidOptions)
	}
	for _, c := range name {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("%w: policy name %q: character %q not in [A-Za-z0-9_-]", ErrInvalidOptions, name, c)
		}
	}
	return nil
}
