// Picks a model tier for the upstream from the caller's header and refuses unknown tiers.
// Runs as a JavaScript step (policies/javascript.yaml); `context`, `request`, `print` are
// tollgate's Apigee-style script API.
var tier = request.getHeader('x-tier') || 'free';
var models = { free: 'small', pro: 'large' };
if (!(tier in models)) {
  throw { status: 400, code: 'custom.UnknownTier', message: 'unknown tier ' + tier };
}
context.setVariable('route.model', models[tier]);
request.setHeader('x-tollgate-model', models[tier]);
