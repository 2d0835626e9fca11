var client = context.getVariable('request.header.x-client') || 'none';
context.setVariable('request.header.x-tier', tierOf(client));
