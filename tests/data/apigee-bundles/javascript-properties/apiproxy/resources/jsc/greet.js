context.setVariable('greeting', properties.greeting);
