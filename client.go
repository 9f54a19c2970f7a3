// Client settings: the go-redis options this library recommends for a
// cache client (Recommended).

package cacheaside

import (
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
// (DefaultClusterStateReloadInterval) unless set. It leaves every timeout
// as opt has it. The README's "Client settings" gives
// the reason for each; in short, an outage then shows up as "connection
// refused" within a millisecond or two, and the breaker opens at once.
// DefaultClusterStateReloadInterval is the ClusterStateReloadInterval
// Recommended gives a Cluster client: how old go-redis lets its slot map
// grow before it reloads it on the next command (go-redis's default is a
// minute). After a master fails over, the client sends the dead master's
// slots to the dead address until it reloads, so this bounds how long
// those keys go without Redis; a reload is one CLUSTER SLOTS, at most this
// often, and only while commands are sent.
const DefaultClusterStateReloadInterval = time.Second

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
			o.ClusterStateReloadInterval = DefaultClusterStateReloadInterval
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
