// Client settings: the go-redis options this library recommends for a
// cache client (Recommended), and what New checks of the client it is given.

package cacheaside

import (
	"context"
	"log/slog"
	"reflect"
	"time"

	"github.com/redis/go-redis/v9"
)

// Recommended applies the go-redis settings this library recommends for a
// cache client to opt, and returns opt (a nil opt means a new, zero one),
// so a client is built in one line:
//
//	rdb := redis.NewClient(cacheaside.Recommended(&redis.Options{Addr: "localhost:6379"}))
//
// It works on the options of every client New accepts: *redis.Options
// (Client, and the URL parsers' result), *redis.FailoverOptions
// (Sentinel), *redis.ClusterOptions, *redis.RingOptions and
// *redis.UniversalOptions. It sets ContextTimeoutEnabled, MaxRetries -1
// (no command retries) unless set, and DialerRetries 1 unless set; on
// ClusterOptions also ClusterStateReloadInterval
// (defaultClusterStateReloadInterval) unless set. It leaves every timeout
// as opt has it. The README's "Client settings" gives
// the reason for each; in short, an outage then shows up as "connection
// refused" within a millisecond or two, and the breaker opens at once.
// defaultClusterStateReloadInterval is the ClusterStateReloadInterval
// Recommended gives a Cluster client: how old go-redis lets its slot map
// grow before it reloads it on the next command (go-redis's default is a
// minute). After a master fails over, the client sends the dead master's
// slots to the dead address until it reloads, so this bounds how long
// those keys go without Redis; a reload is one CLUSTER SLOTS, at most this
// often, and only while commands are sent.
const defaultClusterStateReloadInterval = time.Second

func Recommended[O *redis.Options | *redis.FailoverOptions | *redis.ClusterOptions | *redis.RingOptions | *redis.UniversalOptions](opt O) O {
	if reflect.ValueOf(opt).IsNil() {
		opt = reflect.New(reflect.TypeFor[O]().Elem()).Interface().(O)
	}
	switch o := any(opt).(type) {
	case *redis.Options:
		recommend(&o.ContextTimeoutEnabled, &o.MaxRetries, &o.DialerRetries)
	case *redis.FailoverOptions:
		recommend(&o.ContextTimeoutEnabled, &o.MaxRetries, &o.DialerRetries)
	case *redis.ClusterOptions:
		recommend(&o.ContextTimeoutEnabled, &o.MaxRetries, &o.DialerRetries)
		if o.ClusterStateReloadInterval == 0 {
			o.ClusterStateReloadInterval = defaultClusterStateReloadInterval
		}
	case *redis.RingOptions:
		recommend(&o.ContextTimeoutEnabled, &o.MaxRetries, &o.DialerRetries)
	case *redis.UniversalOptions:
		recommend(&o.ContextTimeoutEnabled, &o.MaxRetries, &o.DialerRetries)
	}
	return opt
}

// recommend sets the settings every client type shares (see Recommended).
func recommend(contextTimeout *bool, maxRetries, dialerRetries *int) {
	*contextTimeout = true
	if *maxRetries == 0 {
		*maxRetries = -1
	}
	if *dialerRetries == 0 {
		*dialerRetries = 1
	}
}

// scansOneNode reports whether InvalidatePrefix can reach only one node of
// rdb: a client that is neither go-redis's own single-node client nor has
// a way to visit every node.
func scansOneNode(rdb Redis) bool {
	switch rdb.(type) {
	case *redis.Client, interface {
		ForEachMaster(context.Context, func(context.Context, *redis.Client) error) error
	}, interface {
		ForEachShard(context.Context, func(context.Context, *redis.Client) error) error
	}:
		return false
	}
	return true
}

// socketDeadlines reports whether rdb puts a command's context deadline on
// its socket (go-redis's ContextTimeoutEnabled), and whether that is known
// (a go-redis client, not a wrapper).
func socketDeadlines(rdb Redis) (enabled, known bool) {
	switch c := rdb.(type) {
	case *redis.Client:
		return c.Options().ContextTimeoutEnabled, true
	case *redis.ClusterClient:
		return c.Options().ContextTimeoutEnabled, true
	case *redis.Ring:
		return c.Options().ContextTimeoutEnabled, true
	}
	return false, false
}

// warnClientOptions logs once, at New, when a go-redis client will not put
// a context deadline on the socket.
func warnClientOptions(rdb Redis, log *slog.Logger, name string) {
	if enabled, known := socketDeadlines(rdb); known && !enabled {
		log.Warn("cacheaside: go-redis ContextTimeoutEnabled is false, so context deadlines do not reach the socket and a hung Redis can hold a Get for the client's ReadTimeout; set ContextTimeoutEnabled: true",
			slog.String("cache", name))
	}
}
