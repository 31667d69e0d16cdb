"""Feature flags: a tool, guard, prompt fragment or parameter override turned on for a share of
users or tenants (sticky) and/or a tenant list, independent of the version split. Defaults come
from the sidecar config (`flags:`, `sidecar.flags._model`); signed `FlagState` records on
`outrider.control` change them at run time (`sidecar.flags._book`); `sidecar.flags._effects`
makes a session's version what its flags say.

Import the submodules directly: the config model is loaded with the config, before routing."""
